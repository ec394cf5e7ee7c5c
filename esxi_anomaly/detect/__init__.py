"""Detection: the calibrated isolation forest, rules as data, the ensemble score and explanations."""
