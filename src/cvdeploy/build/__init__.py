"""Building bundles from source models (imports torch and ultralytics: keep off the inference path)."""

from cvdeploy.build.export import BUILD_STEPS, build_bundle

__all__ = ["BUILD_STEPS", "build_bundle"]
