"""Occlusion: the pattern vocabulary, occluders and the synthesiser."""

from fromface.occlusion.patterns import PatternVocabulary, label_patterns, num_patterns, patterns

__all__ = ["PatternVocabulary", "label_patterns", "num_patterns", "patterns"]
