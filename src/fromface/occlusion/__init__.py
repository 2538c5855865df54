"""Occlusion: the pattern vocabulary, occluders and the synthesiser."""

from fromface.occlusion.occluders import Occluder, OccluderLibrary
from fromface.occlusion.patterns import PatternVocabulary, label_patterns, num_patterns, patterns
from fromface.occlusion.synth import PRESETS, OcclusionResult, Preset, Synthesizer, rng_for

__all__ = ["PatternVocabulary", "label_patterns", "num_patterns", "patterns"]
__all__ += ["Occluder", "OccluderLibrary", "OcclusionResult", "PRESETS", "Preset", "Synthesizer", "rng_for"]
