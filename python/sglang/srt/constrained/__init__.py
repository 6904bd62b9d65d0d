"""Constrained decoding: grammars (regex, JSON schema, EBNF) that restrict each next token."""
