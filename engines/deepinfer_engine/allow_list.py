"""What an agent agrees to run. The deployments API lets whoever holds the router's
admin key start commands on every GPU host; each agent therefore keeps its own
allow-lists and refuses a replica outside them (its status says why). Pure.

- images (`--allow-image PATTERN`, shell-style globs): a `backend: docker` replica's
  image must match one; none given, no container runs.
- model roots (`--allow-model-root DIR`): a model that is not a Hugging Face id
  (`name` or `org/name`) is a path and must be absolute and lie under one, as written and
  with symlinks resolved; so must a docker replica's `model_path`. None given, no local
  path is accepted.
- extra arguments (`--allow-extra-arg FLAG`): every flag in `extra_args` must be listed
  (`--trust-remote-code` runs the model repository's code); none given, none accepted.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
from dataclasses import dataclass

from deepinfer_router.shared.deployment import DeploymentSpec

# A Hugging Face id: `name` or `org/name`, nothing that could be a path elsewhere.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def is_hub_id(model: str) -> bool:
    return bool(_HUB_ID.fullmatch(model)) and ".." not in model


def _under(path: str, roots: tuple[str, ...]) -> bool:
    """Whether `path` (absolute) lies under a root, both as written (`..` collapsed) and
    as the kernel resolves it here (symlinks followed), so neither form escapes."""
    if not path.startswith("/"):
        return False
    forms = {posixpath.normpath(path), os.path.realpath(path)}
    for root in roots:
        r = posixpath.normpath(root).rstrip("/") or "/"
        real = os.path.realpath(r)
        if all(any(f == x or f.startswith(x.rstrip("/") + "/") for x in (r, real))
               for f in forms):
            return True
    return False


@dataclass(frozen=True)
class AllowList:
    images: tuple[str, ...] = ()
    model_roots: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()

    def refusal(self, spec: DeploymentSpec) -> str | None:
        """Why this agent will not run `spec`, or None."""
        if spec.backend == "docker":
            assert spec.docker_image and spec.model_path
            if not any(fnmatch.fnmatchcase(spec.docker_image, p) for p in self.images):
                return (f"image {spec.docker_image!r} is not allowed on this host "
                        f"(--allow-image: {', '.join(self.images) or 'none'})")
            if not _under(spec.model_path, self.model_roots):
                return self._root_refusal("model_path", spec.model_path)
        elif not is_hub_id(spec.model) and not _under(spec.model, self.model_roots):
            return self._root_refusal("model", spec.model)
        allowed = set(self.extra_args)
        for arg in spec.extra_args:
            if arg.startswith("-"):
                flag = arg.split("=", 1)[0]
                if flag not in allowed:
                    return (f"extra argument {flag} is not allowed on this host "
                            f"(--allow-extra-arg: {', '.join(self.extra_args) or 'none'})")
        return None

    def _root_refusal(self, field: str, path: str) -> str:
        return (f"{field} {path!r} is outside the allowed model roots "
                f"(--allow-model-root: {', '.join(self.model_roots) or 'none'})")
