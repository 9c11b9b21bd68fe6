"""Readers for the files in deploy/: Dockerfile instructions and the kustomize render.

Kept deliberately small: enough structure for tests/deploy to check that the
Dockerfile, compose.yaml and the Kubernetes manifests agree with each other and with
streamd's defaults, not a general Dockerfile or kustomize implementation.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..conftest import ROOT

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


@dataclass(frozen=True)
class Instruction:
    stage: int  # index of the FROM this instruction belongs to
    keyword: str  # upper case: FROM, RUN, COPY, ...
    text: str  # the rest of the (joined) line

    def exec_form(self) -> list[str]:
        """The JSON array of CMD/ENTRYPOINT (and HEALTHCHECK after its CMD keyword)."""
        text = self.text.split(" CMD ", 1)[1] if self.keyword == "HEALTHCHECK" else self.text
        return json.loads(text)


def dockerfile(path: Path = DEPLOY / "Dockerfile") -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        pending = ""
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(stage, keyword, rest.strip()))
    return out


def render_kustomization(directory: Path = K8S) -> list[dict]:
    """``kubectl kustomize DIR`` when kubectl is installed, else :func:`concat_resources`."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return concat_resources(directory)
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def concat_resources(directory: Path = K8S) -> list[dict]:
    """What kustomize renders for a kustomization that lists only ``resources`` files.

    Anything else in kustomization.yaml (patches, generators, images, namespace, ...)
    is refused rather than ignored, so the result is never quietly different.
    """
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources"}
    if unsupported:
        raise ValueError(f"kustomization fields not rendered without kubectl: {sorted(unsupported)}")
    docs: list[dict] = []
    for name in kustomization["resources"]:
        docs.extend(doc for doc in yaml.safe_load_all((directory / name).read_text()) if doc)
    return docs


def by_kind(docs: list[dict]) -> dict[str, dict]:
    """{kind: resource}; each kind appears once in deploy/k8s."""
    kinds = [doc["kind"] for doc in docs]
    assert len(kinds) == len(set(kinds)), kinds
    return {doc["kind"]: doc for doc in docs}


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])
