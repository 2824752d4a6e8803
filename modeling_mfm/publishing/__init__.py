"""Publishing to the Hub: the one publisher (`hub`) that training runs, the converter and releases share, the
model-card template (`model_card`) and the names inside an output folder (`folder_layout`). Imports the model; the
model never imports this package."""
