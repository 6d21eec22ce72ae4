"""Which project a node works for: a node signs updates only for the project it joined.

A task names its project, but a coordinator could relay another project's task
to its volunteers and collect updates signed for that project. So a node binds
to one project: the one given to `join --project`, else the first one seen at
its coordinator's address (trust on first use, remembered per identity and
address in a small JSON file), and refuses tasks of any other project.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from loracommons.client.volunteer import VolunteerError

_lock = threading.Lock()


class WrongProject(VolunteerError):
    """A task for a project this node did not join."""


@dataclass(frozen=True)
class ProjectBinding:
    superlink: str
    """The coordinator's address this node joined."""
    bindings_file: Path | None
    """Where first-seen projects are remembered, per address (None: not remembered)."""
    project: str | None = None
    """The project given to `join --project` (wins over what is remembered)."""

    @classmethod
    def from_node_config(cls, node_config: dict) -> ProjectBinding | None:
        """The binding `loracommons join` put in the node config, or None when there is none."""
        if not node_config.get("superlink"):
            return None
        path = node_config.get("bindings")
        return cls(str(node_config["superlink"]), Path(str(path)) if path else None,
                   str(node_config["project"]) if node_config.get("project") else None)

    def _remembered(self) -> dict[str, str]:
        if self.bindings_file is None:
            return {}
        try:
            data = json.loads(self.bindings_file.read_text())
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}

    def _remember(self, bindings: dict[str, str]) -> None:
        if self.bindings_file is None:
            return
        self.bindings_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.bindings_file.with_name(f"{self.bindings_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(bindings, indent=1, sort_keys=True))
        os.replace(tmp, self.bindings_file)

    def check(self, project_id: str) -> bool:
        """Accept a task of `project_id` or raise `WrongProject`; True when this is the first project
        seen at this address (now remembered)."""
        if self.project is not None:
            if project_id != self.project:
                raise WrongProject(f"refused a task of project {project_id!r}: this node joined project "
                                   f"{self.project!r} (--project) at {self.superlink}")
            return False
        with _lock:
            bindings = self._remembered()
            bound = bindings.get(self.superlink)
            if bound is None:
                self._remember({**bindings, self.superlink: project_id})
                return True
        if project_id != bound:
            raise WrongProject(f"refused a task of project {project_id!r}: this node's identity joined "
                               f"project {bound!r} at {self.superlink} (remembered in {self.bindings_file}; "
                               "start join with --project ID to choose another)")
        return False
