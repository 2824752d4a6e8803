"""Tools around the model: official checkpoint conversion (with an independent parity reference) and the release
catalogue; their model cards and Hub uploads go through `modeling_mfm.publishing`. Imports the model and publishing;
the model never imports this package."""
