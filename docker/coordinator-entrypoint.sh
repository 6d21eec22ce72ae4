#!/bin/sh
# Coordinator container entrypoint: create the project on first start, then run it.
#
#   first start (no $LC_PROJECT_DIR/project.toml): check the LC_CONFIG__* settings,
#     `loracommons coordinator init`, write the settings into project.toml
#   every start: exec `loracommons coordinator start` (arguments given to the
#     container are passed on to it), which resumes from the project's state
#
# Environment (defaults in brackets):
#   LC_PROJECT_DIR [/project]    project folder (a volume)
#   LC_BASE_MODEL [loracommons/demo-tiny]  Hugging Face id or local folder (first start)
#   LC_BASE_MODEL_REVISION, LC_PROJECT_NAME, LC_MODE [ffa], LC_MEMBERSHIP [open]  (first start)
#   LC_CONFIG__<SECTION>__<KEY>=VALUE  any project.toml key (first start), e.g.
#     LC_CONFIG__ROUND__ROUNDS=3, LC_CONFIG__TRAIN__MAX_STEPS=50; VALUE is a TOML value
#     (3, 0.5, true, ["q_proj", "v_proj"]) or a bare string; empty = keep the default.
#     After the first start, edit project.toml in the volume instead.
#   LC_HOST [0.0.0.0], LC_FLEET_PORT [9092]      SuperLink (volunteers connect here)
#   LC_HTTP_HOST [0.0.0.0], LC_HTTP_PORT [8000]  HTTP API and dashboard
#   LC_TLS=1 with LC_TLS_DIR [/certs] holding ca.pem, server.pem, server.key
#     (or LC_SSL_CA_CERTFILE, LC_SSL_CERTFILE, LC_SSL_KEYFILE), or
#   LC_INSECURE=1: no TLS, for a local community only.
set -eu

dir="${LC_PROJECT_DIR:-/project}"

say() { printf '%s\n' "coordinator-entrypoint: $*" >&2; }

# Apply (or with --check only validate) the LC_CONFIG__* settings.
lc_config() {
    python - "$@" <<'PY'
import os
import sys
import tomllib
from pathlib import Path

from loracommons.coordinator.config import ConfigError, ProjectConfig, write_default_toml

PREFIX = "LC_CONFIG__"


def settings():
    out = {}
    for name, raw in sorted(os.environ.items()):
        if not name.startswith(PREFIX) or not raw.strip():
            continue
        parts = name[len(PREFIX):].lower().split("__")
        if len(parts) != 2 or not all(parts):
            sys.exit(f"coordinator-entrypoint: {name}: expected LC_CONFIG__<SECTION>__<KEY>")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare string
        out[(name, *parts)] = value
    return out


def merged(obj, values):
    obj = {section: dict(keys) for section, keys in obj.items()}
    for (_, section, key), value in values.items():
        obj.setdefault(section, {})[key] = value
    return obj


def validate(obj, values):
    try:
        return ProjectConfig.from_dict(merged(obj, values))
    except ConfigError as exc:
        names = ", ".join(name for name, *_ in values) or "(none)"
        sys.exit(f"coordinator-entrypoint: invalid settings ({names}): {exc}")


values = settings()
if sys.argv[1] == "--check":  # before `init`: nothing is written if a setting is wrong
    env = os.environ
    project = {"base_model": env.get("LC_BASE_MODEL") or "loracommons/demo-tiny",
               "membership": env.get("LC_MEMBERSHIP") or "open"}
    base = merged(ProjectConfig().to_dict(), {})
    base["project"].update(project)
    base["aggregation"]["mode"] = env.get("LC_MODE") or "ffa"
    validate(base, values)
    sys.exit(0)
path = Path(sys.argv[1])
cfg = validate(tomllib.loads(path.read_text(encoding="utf-8")), values)
tmp = path.with_name(path.name + ".tmp")
write_default_toml(tmp, cfg)
tmp.replace(path)
for (name, section, key), value in values.items():
    print(f"coordinator-entrypoint: [{section}] {key} = {value!r} (from {name})", file=sys.stderr)
PY
}

tls_dir="${LC_TLS_DIR:-/certs}"
if [ "${LC_TLS:-0}" = "1" ]; then
    ca="${LC_SSL_CA_CERTFILE:-$tls_dir/ca.pem}"
    cert="${LC_SSL_CERTFILE:-$tls_dir/server.pem}"
    key="${LC_SSL_KEYFILE:-$tls_dir/server.key}"
    for f in "$ca" "$cert" "$key"; do
        if [ ! -r "$f" ]; then
            say "LC_TLS=1 but $f is missing or unreadable (see docker/README.md, TLS certificates)"
            exit 2
        fi
    done
    set -- --ssl-ca-certfile "$ca" --ssl-certfile "$cert" --ssl-keyfile "$key" "$@"
elif [ "${LC_INSECURE:-0}" = "1" ]; then
    say "LC_INSECURE=1: no TLS; use this for a local community only"
    set -- --insecure "$@"
else
    say "choose TLS (LC_TLS=1 with ca.pem, server.pem, server.key in $tls_dir) or LC_INSECURE=1 (local only)"
    exit 2
fi

if [ ! -f "$dir/project.toml" ]; then
    say "no project in $dir: creating one"
    lc_config --check
    loracommons coordinator init "$dir" \
        --base-model "${LC_BASE_MODEL:-loracommons/demo-tiny}" \
        --mode "${LC_MODE:-ffa}" \
        --membership "${LC_MEMBERSHIP:-open}" \
        ${LC_PROJECT_NAME:+--name "$LC_PROJECT_NAME"} \
        ${LC_BASE_MODEL_REVISION:+--revision "$LC_BASE_MODEL_REVISION"}
    lc_config "$dir/project.toml"
elif env | grep -q '^LC_CONFIG__[A-Za-z_]*=.'; then
    say "$dir already holds a project: LC_CONFIG__* settings are not applied (edit $dir/project.toml)"
fi

exec loracommons coordinator start "$dir" \
    --host "${LC_HOST:-0.0.0.0}" --port "${LC_FLEET_PORT:-9092}" \
    --http-host "${LC_HTTP_HOST:-0.0.0.0}" --http-port "${LC_HTTP_PORT:-8000}" \
    --plain "$@"
