"""The paper's two experiments (feature level and concept level) and their results.

Modules: :mod:`.candidates` (a concept's input- and output-side candidate features and the picks).
"""
