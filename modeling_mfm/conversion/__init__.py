"""Tools around the model: official checkpoint conversion (with an independent parity reference), model cards and
publishing to the Hub. Imports the model; the model never imports this package."""
