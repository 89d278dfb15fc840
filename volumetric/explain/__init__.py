"""Explanations of a prediction: relevance maps (gradient × input on the patch tokens,
volumetric.explain.relevance), written as NIfTI maps and montages (volumetric.explain.save)."""
