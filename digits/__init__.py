"""Training small class-conditional denoisers of every family on scikit-learn's digits
(the embedded default model) and the torch-trained digits judge behind ``runtime.judge``."""
