"""``LcdBayesWarning``: the category of every warning lcd_bayes itself issues (the tests make it an error)."""


class LcdBayesWarning(UserWarning):
    """A warning from lcd_bayes about the data, the fit or the posterior (a ``UserWarning``)."""
