"""The one error the models package raises for a model it cannot run: raised where weights are read
(a GGUF architecture transformers cannot convert) and where a family is picked (an unsupported
model type or variant), and caught by the job's preflight to fail in one line."""


class UnsupportedModelError(ValueError):
    pass
