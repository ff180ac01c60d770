"""Harmony's settings are one value (HarmonySettings) shared by harmonize, build_reference, the CLI and
Reference.params: the same defaults everywhere, and a reference says what it was built with."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

import symphony_dask as sd
from symphony_dask._harmony.settings import FLAVOR_DEFAULTS, HarmonySettings
from symphony_dask.cli.parser import build_parser

BUILD_NAMES = {field.name: field.name for field in dataclasses.fields(HarmonySettings)} | {"flavor": "harmony_flavor"}


def test_build_reference_and_harmonize_defaults_are_the_settings_defaults():
    defaults = HarmonySettings()
    build = inspect.signature(sd.build_reference).parameters
    harmonize = inspect.signature(sd.harmonize).parameters
    for field in dataclasses.fields(HarmonySettings):
        assert build[BUILD_NAMES[field.name]].default == getattr(defaults, field.name), field.name
        if field.name != "max_iter_harmony":  # harmonize runs 10 iterations of either flavor
            assert harmonize[field.name].default == getattr(defaults, field.name), field.name
    assert harmonize["max_iter_harmony"].default == 10


def test_command_line_defaults_are_the_settings_defaults():
    build = build_parser()._subparsers._group_actions[0].choices["build"]
    given = {action.dest: action.default for action in build._actions}
    assert given["theta"] == HarmonySettings.theta and given["seed"] == HarmonySettings.seed
    assert given["harmony_flavor"] == HarmonySettings.flavor and given["max_iter_harmony"] is None
    assert [c for c in build._option_string_actions["--harmony-flavor"].choices] == list(FLAVOR_DEFAULTS)


def test_resolved_fills_the_flavor_defaults_and_warns_for_ignored_ones():
    harmony1 = HarmonySettings().resolved(1)
    assert (harmony1.lamb, harmony1.max_iter_harmony, harmony1.n_init, harmony1.alpha) == (1.0, 20, 10, None)
    harmony2 = HarmonySettings(flavor="harmony2", theta=[1, 2]).resolved(2)
    assert (harmony2.lamb, harmony2.alpha, harmony2.max_iter_cluster, harmony2.theta) == (None, 0.2, 4, (1.0, 2.0))
    with pytest.warns(UserWarning, match="alpha is a harmony2 setting"):
        assert HarmonySettings(alpha=0.5).resolved(1).alpha is None
    with pytest.raises(ValueError, match=r"theta=\[1, 2, 3\]: the diversity penalty takes one value or one per"):
        HarmonySettings(theta=[1, 2, 3]).resolved(2)


def test_a_reference_records_its_settings(built_reference):
    settings = built_reference.harmony_settings
    assert settings == HarmonySettings(theta=2.0).resolved(1)
    assert HarmonySettings.from_params(settings.params()) == settings
    assert built_reference.params["harmony_flavor"] == "harmony1" and built_reference.params["max_iter_harmony"] == 20
