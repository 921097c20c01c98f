"""adainfer-ray: offline text classification at scale with early-exit LLMs (AdaInfer) on Ray Data."""

__version__ = "0.2.0"  # the one version: pyproject.toml reads it ([tool.setuptools.dynamic])


def label(ds, **kwargs):
    """Early-exit labeling as one stage of a Ray Data pipeline: see `adainfer_ray.job.stage.label`.
    (Imported on first use, so that `import adainfer_ray` stays light.)"""
    from adainfer_ray.job.stage import label as _label

    return _label(ds, **kwargs)
