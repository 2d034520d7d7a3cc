"""Zero-shot evaluation: eval-set readers, scoring and the restored model."""
