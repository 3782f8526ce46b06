"""What lcd_bayes reports: ``LcdBayesWarning``, the category of every warning it issues (the tests
make it an error), and the errors whose messages say what to do. Free of heavy imports, so that the
command line can catch them before it loads the model."""


class LcdBayesWarning(UserWarning):
    """A warning from lcd_bayes about the data, the fit or the posterior (a ``UserWarning``)."""


class DataError(ValueError):
    """Bad input data; the message says what is wrong and how to fix it."""


class FitError(RuntimeError):
    """The fit cannot go on; the message says why and what to change."""
