"""Training small class-conditional denoisers of every family on scikit-learn's digits
(the embedded default model), their quality table, and the torch-free digits judge
(``edgediff.digits.judge``). May import export and runtime; they never import it."""
