"""Stage 3: prediction with multi-sample uncertainty, in the input's geometry."""
