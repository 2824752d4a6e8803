"""Publishing to the Hub: the one publisher (`hub`) that training runs, the converter and releases share, and the
model-card template (`model_card`). Imports the model; the model never imports this package."""
