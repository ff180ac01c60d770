"""Reading and writing.

Lazy AnnData reading in row chunks (Expression), obs filters, input validation and the spelling of parameters
in messages, atomic writes that never replace what is not ours.
"""
