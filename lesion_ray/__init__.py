"""lesion-ray: skin-lesion segmentation of dermoscopic images at archive scale, on Ray.

The public surface, which later versions keep compatible:

- the ``lesion-ray`` command (:func:`lesion_ray.cli.main`; ``cli.main(["run", "jobs/predict.yaml"])`` from
  Python returns its exit status), driven by YAML job specs and cluster configs;
- in Python: :func:`lesion_ray.spec.load` reads a job spec, :func:`lesion_ray.cluster.load_cluster` a cluster
  config, :meth:`lesion_ray.settings.Settings.build` makes the job's settings from both, and each job kind's
  module (``synth``, ``train``, ``predict``, ``evaluate``, ``serve``, ``pipeline``) runs it with
  ``run(spec, settings)`` on a started Ray (:func:`lesion_ray.cli.run_here` does all of that);
- the model registry (:func:`lesion_ray.registry.publish`, ``resolve``, ``load_model``), storage URIs
  (:mod:`lesion_ray.storage`) and predict's manifest (:func:`lesion_ray.manifest.read`, ``merge``, ``SCHEMA``).

Everything else (data layout, preprocessing, models, losses, inference, metrics, report pages, tracking) is
internal and may change. :mod:`lesion_ray.testing` is the test and demo harness (real Ray nodes on loopback).
"""

__all__ = ["cli", "cluster", "evaluate", "manifest", "pipeline", "predict", "registry", "serve", "settings", "spec",
           "storage", "synth", "train"]
