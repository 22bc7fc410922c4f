"""Structured output: tokens constrained to a JSON schema, a regex or a Lark grammar.

The grammar library (llguidance) is imported only here, and only when a constrained request
arrives: the router and the GPU check never load it.
"""
