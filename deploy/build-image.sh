#!/usr/bin/env bash
# Build the replicad container image from the repository's Dockerfile with buildah, which needs
# no Docker engine, then check the image.
#
#   deploy/build-image.sh [TAG]            TAG defaults to replicad:test
#
# 1. Installs buildah and debootstrap with apt-get if either is missing. This needs root.
# 2. Makes a minimal Debian bookworm rootfs (debootstrap --variant=minbase with python3,
#    python3-venv and ca-certificates) and keeps it as a tarball in the cache directory. It is
#    imported as the local image localhost/replicad-base:bookworm-<key>, where <key> changes
#    with the package list.
# 3. Runs buildah bud --build-arg BASE=<that image> -t TAG on the Dockerfile. The build step
#    runs pip, which needs to reach the Python package index.
# 4. Runs `replicad --version` in the image and checks it against replicad/__init__.py. It
#    also checks the image configuration (non-root numeric USER, ENTRYPOINT, CMD, STOPSIGNAL,
#    HEALTHCHECK). Then it runs a smoke test inside the image as the image's own user:
#    replicate a WAL database under /data, probe it with the image's HEALTHCHECK command, send
#    SIGTERM and expect exit 0, restore, and compare the rows. It also runs the init
#    container's restore flags, checks the S3 replica when REPLICAD_SMOKE_S3_URL is set, and
#    checks that the image has no compiler.
# 5. Exits 0 only if all of that worked. On any failure it exits 1 after the line
#    "build-image: FAILED: <what>". It exits 77 after the line
#    "build-image: CANNOT RUN HERE: <evidence>" when this machine cannot run buildah at all:
#    not root, so nothing can be installed, or no container can be started with any isolation.
#    tests/test_container.py turns exit 77 into a skip.
#
# Environment (all optional):
#   REPLICAD_BASE_IMAGE   use this image as BASE and skip step 2, e.g. python:3.11.10-slim-bookworm
#                         (the Dockerfile's default) where a container registry is reachable.
#   REPLICAD_IMAGE_CACHE  where the rootfs tarball is kept (default ~/.cache/replicad-image).
#   DEBIAN_MIRROR         mirror for debootstrap. The default is debootstrap's own.
#   BUILDAH_ISOLATION     oci or chroot. The default is to try oci and fall back to chroot.
#                         chroot needs no cgroups, user namespaces or OCI runtime when run as
#                         root. That is what works on machines whose cgroups are in hybrid mode,
#                         where crun refuses to start containers.
#   REPLICAD_SMOKE_S3_URL an S3 replica URL on this host (s3://bucket/prefix?endpoint=http://
#                         127.0.0.1:PORT&path_style=true&region=...) for the smoke test to use as
#                         well, with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY passed into the
#                         container. It checks the S3 client and credentials from the
#                         environment, and the init-container restore from that URL.
#                         tests/test_container.py starts moto_server for it.
#   REPLICAD_BUILD_CA     CA bundle that pip in the build should trust (build secret pip_ca,
#                         never stored in the image). Defaults to $PIP_CERT, $SSL_CERT_FILE or
#                         $REQUESTS_CA_BUNDLE, whichever is set first. Passing the system
#                         bundle is harmless. It matters on hosts whose HTTPS goes through a
#                         TLS-inspecting proxy.
set -Eeuo pipefail

TAG=${1:-replicad:test}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${REPLICAD_IMAGE_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/replicad-image}
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates
STEP="start"
CONTAINERS=()
BUILDAH=(buildah)

say() { printf 'build-image: %s\n' "$*"; }
fail() { say "FAILED: $*" >&2; exit 1; }
cannot() { say "CANNOT RUN HERE: $*" >&2; exit 77; }
step() { STEP=$1; say "== $1"; }
cleanup() {
    local c
    for c in "${CONTAINERS[@]}"; do "${BUILDAH[@]}" rm "$c" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT
trap 'fail "step \"$STEP\": command failed (exit $?): $BASH_COMMAND"' ERR
is_root() { [ "$(id -u)" = 0 ]; }
elapsed() { printf '%ss' "$((SECONDS - $1))"; }

START=$SECONDS
# The isolations to try. BUILDAH_ISOLATION is unset until one has been chosen, so that a bad
# value shows up in the isolation check and is not mistaken for a storage problem.
ISOLATIONS=${BUILDAH_ISOLATION:-oci chroot}
unset BUILDAH_ISOLATION
say "repository $REPO, tag $TAG, cache $CACHE"
command -v python3 >/dev/null || fail "python3 is needed on this machine (reads the image configuration)"
EXPECTED_VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$REPO/replicad/__init__.py")
[ -n "$EXPECTED_VERSION" ] || fail "cannot read __version__ from replicad/__init__.py"

# ---- 1. tools ---------------------------------------------------------------------------------
step "1/5 tools"
missing=()
command -v buildah >/dev/null || missing+=(buildah)
if [ -z "${REPLICAD_BASE_IMAGE:-}" ] && ! command -v debootstrap >/dev/null; then
    missing+=(debootstrap)
fi
if [ ${#missing[@]} -gt 0 ]; then
    if ! is_root; then
        cannot "${missing[*]} not installed and not running as root, so apt-get cannot install them"
    fi
    command -v apt-get >/dev/null || cannot "${missing[*]} not installed and there is no apt-get"
    say "installing ${missing[*]} (with recommends: crun, fuse-overlayfs, uidmap)"
    t=$SECONDS
    apt-get update -q || fail "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" \
        || fail "apt-get install ${missing[*]}"
    say "installed in $(elapsed "$t")"
fi
say "$(buildah --version)"

# Storage: buildah's configured driver (overlay as root). If it cannot even create a working
# container, fall back to vfs in a private store under the cache directory. vfs is slower but
# works on any filesystem, and a private store avoids mixing two drivers in one graph root.
if ! probe=$("${BUILDAH[@]}" from scratch 2>&1); then
    say "default storage unusable ($probe); trying vfs in $CACHE/storage"
    mkdir -p "$CACHE/storage" "$CACHE/run"
    BUILDAH=(buildah --storage-driver vfs --root "$CACHE/storage" --runroot "$CACHE/run")
    probe=$("${BUILDAH[@]}" from scratch 2>&1) \
        || cannot "buildah cannot create a container with overlay or vfs storage: $probe"
fi
"${BUILDAH[@]}" rm "$probe" >/dev/null

# ---- 2. base image ----------------------------------------------------------------------------
step "2/5 base image"
if [ -n "${REPLICAD_BASE_IMAGE:-}" ]; then
    BASE=$REPLICAD_BASE_IMAGE
    say "using BASE=$BASE as given (no debootstrap)"
    PULL=false  # buildah's "pull only if missing"
else
    is_root || cannot "debootstrap needs root (or set REPLICAD_BASE_IMAGE to an existing image)"
    key=$(printf '%s %s minbase\n' "$SUITE" "$PACKAGES" | sha256sum | cut -c1-12)
    BASE=localhost/replicad-base:$SUITE-$key
    tarball=$CACHE/rootfs-$SUITE-$key.tar
    mkdir -p "$CACHE"
    if [ ! -s "$tarball" ]; then
        t=$SECONDS
        rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
        say "debootstrap --variant=minbase --include=$PACKAGES $SUITE (${DEBIAN_MIRROR:-default mirror})"
        if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" \
            ${DEBIAN_MIRROR:+"$DEBIAN_MIRROR"} >"$CACHE/debootstrap.log" 2>&1; then
            tail -20 "$CACHE/debootstrap.log" >&2
            rm -rf "$rootfs"
            fail "debootstrap (log: $CACHE/debootstrap.log)"
        fi
        # Nothing the image needs: downloaded .debs and package lists.
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
        rm -rf "$rootfs"
        say "rootfs made in $(elapsed "$t"): $tarball ($(du -h "$tarball" | cut -f1))"
    else
        say "rootfs cached: $tarball"
    fi
    if ! "${BUILDAH[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
        t=$SECONDS
        ctr=$("${BUILDAH[@]}" from scratch)
        CONTAINERS+=("$ctr")
        "${BUILDAH[@]}" add "$ctr" "$tarball" / >/dev/null  # a tarball is extracted
        "${BUILDAH[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            --cmd /bin/sh "$ctr"
        "${BUILDAH[@]}" commit --quiet "$ctr" "$BASE" >/dev/null
        say "imported $BASE in $(elapsed "$t")"
    else
        say "base image present: $BASE"
    fi
    PULL=never
fi

# Isolation: the first of oci and chroot that can run a command in a container of BASE.
ctr=$("${BUILDAH[@]}" from --quiet --pull="$PULL" "$BASE")
CONTAINERS+=("$ctr")
evidence=""
ISOLATION=""
for iso in $ISOLATIONS; do
    if out=$("${BUILDAH[@]}" run --isolation "$iso" "$ctr" -- python3 -c 'print("ok")' 2>&1) \
        && [ "$(printf '%s' "$out" | tail -1)" = ok ]; then
        ISOLATION=$iso
        break
    fi
    evidence+="[$iso: $(printf '%s' "$out" | tr '\n' ' ' | cut -c1-300)] "
done
[ -n "$ISOLATION" ] || cannot "buildah cannot run a container with any isolation: $evidence"
say "isolation: $ISOLATION${evidence:+ (not usable here: $evidence)}"
export BUILDAH_ISOLATION=$ISOLATION

# ---- 3. build ---------------------------------------------------------------------------------
step "3/5 build"
secret=()
ca=${REPLICAD_BUILD_CA:-${PIP_CERT:-${SSL_CERT_FILE:-${REQUESTS_CA_BUNDLE:-}}}}
if [ -n "$ca" ] && [ -s "$ca" ]; then
    secret=(--secret "id=pip_ca,src=$ca")
    say "pip in the build trusts the CA bundle $ca (build secret pip_ca)"
fi
previous=$("${BUILDAH[@]}" inspect --type image --format '{{.FromImageID}}' "$TAG" 2>/dev/null || true)
t=$SECONDS
# --format docker: the OCI image configuration has no HEALTHCHECK field (buildah drops it with
# a warning), and the Docker format keeps it. Every engine and registry reads this format.
"${BUILDAH[@]}" bud --format docker --pull="$PULL" --isolation "$ISOLATION" \
    "${secret[@]}" --build-arg "BASE=$BASE" -t "$TAG" -f "$REPO/Dockerfile" "$REPO" \
    || fail "buildah bud (BASE=$BASE)"
say "built $TAG in $(elapsed "$t")"
# The image that had this tag before is now untagged. Remove it, so repeated builds (the slow
# test) do not pile up images. This fails harmlessly if a container still uses it.
current=$("${BUILDAH[@]}" inspect --type image --format '{{.FromImageID}}' "$TAG")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
    "${BUILDAH[@]}" rmi "$previous" >/dev/null 2>&1 || true
fi

# ---- 4. check ---------------------------------------------------------------------------------
step "4/5 check"
config=$("${BUILDAH[@]}" inspect --type image "$TAG")
HEALTHCHECK=$(printf '%s' "$config" | python3 -c '
import json, sys
c = json.load(sys.stdin)["Docker"]["config"]
problems = []
user = c.get("User", "")
uid = user.split(":")[0]
if not uid.isdigit() or uid == "0":
    problems.append(f"USER {user!r} is not a numeric non-root uid")
expected = {
    "Entrypoint": ["replicad"],
    "Cmd": ["replicate", "-c", "/etc/replicad.toml"],
    "StopSignal": "SIGTERM",
}
for key, want in expected.items():
    if c.get(key) != want:
        problems.append(f"{key} is {c.get(key)}, expected {want}")
test = (c.get("Healthcheck") or {}).get("Test") or []
if not test or test[0] != "CMD":
    problems.append(f"HEALTHCHECK is {test}")
if problems:
    sys.exit("image configuration: " + "; ".join(problems))
print(json.dumps(test[1:]))
') || fail "image configuration"
say "image configuration: non-root USER, ENTRYPOINT, CMD, STOPSIGNAL and HEALTHCHECK as expected"

ctr=$("${BUILDAH[@]}" from --pull=never "$TAG")
CONTAINERS+=("$ctr")
version=$("${BUILDAH[@]}" run "$ctr" -- replicad --version) || fail "replicad --version in the image"
say "replicad --version in the image: $version"
[ "$version" = "replicad $EXPECTED_VERSION" ] \
    || fail "replicad --version printed '$version', expected 'replicad $EXPECTED_VERSION'"

# The smoke test runs inside the image with its interpreter, as the image's USER.
read -r -d '' SMOKE <<'PY' || true
import json, os, shutil, signal, socket, sqlite3, subprocess, sys, time, urllib.request

probe = json.loads(sys.argv[1])  # the image's HEALTHCHECK command
problems = []
for tool in ("cc", "gcc", "c++", "g++", "clang", "make", "ld"):
    if shutil.which(tool):
        problems.append(f"{tool} at {shutil.which(tool)}")
if os.path.exists("/opt/replicad/bin/pip"):
    problems.append("pip in the runtime venv")
if problems:
    sys.exit("build tools in the image: " + ", ".join(problems))
print(f"smoke: uid {os.getuid()} gid {os.getgid()}; no compiler, no pip in /opt/replicad")
if os.getuid() == 0:
    sys.exit("the image runs as root")

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
env = dict(os.environ, REPLICAD_HEALTHCHECK_URL=f"http://127.0.0.1:{port}/readyz")
def healthy():
    return subprocess.run(probe, env=env, capture_output=True, timeout=10).returncode == 0

work = "/data/smoke"  # /data belongs to the image's user
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
db, restored = f"{work}/app.db", f"{work}/restored.db"
s3_url = os.environ.get("SMOKE_S3_URL", "")
config = f'''
metrics_addr = "127.0.0.1:{port}"
shutdown_timeout = 30
log_format = "json"
[[databases]]
path = "{db}"
  [[databases.replicas]]
  name = "file"
  url = "file://{work}/backup"
'''
if s3_url:  # credentials come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, as in a Pod
    config += f'''
  [[databases.replicas]]
  name = "s3"
  url = "{s3_url}"
'''
with open(f"{work}/replicad.toml", "w") as f:
    f.write(config)
conn = sqlite3.connect(db, isolation_level=None)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("CREATE TABLE t (x INTEGER)")
if healthy():
    sys.exit("HEALTHCHECK passed with no replicad listening")
daemon = subprocess.Popen(["replicad", "replicate", "-c", f"{work}/replicad.toml"])
deadline = time.monotonic() + 60
while not healthy():
    if daemon.poll() is not None or time.monotonic() > deadline:
        daemon.kill()
        sys.exit(f"HEALTHCHECK never passed (replicad exit status {daemon.poll()})")
    time.sleep(0.2)
print("smoke: HEALTHCHECK passes once replicad is ready")
for i in range(100):
    conn.execute("INSERT INTO t VALUES (?)", (i,))
metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
if "replicad_transactions_total" not in metrics:
    sys.exit("/metrics has no replicad_transactions_total")
t0 = time.monotonic()
daemon.send_signal(signal.SIGTERM)
status = daemon.wait(60)
print(f"smoke: SIGTERM -> exit status {status} after {time.monotonic() - t0:.2f} s")
if status != 0:
    sys.exit(f"replicad exited {status} after SIGTERM")
if not os.path.isdir(f"{work}/.app.db-replicad"):
    sys.exit("no state directory .app.db-replicad beside the database")
def restore(out, url, *extra):
    r = subprocess.run(["replicad", "restore", *extra, "-o", out, url],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        sys.exit(f"restore {extra} from {url} exited {r.returncode}: {r.stderr}")
    return r.stdout
def rows(path):
    return sqlite3.connect(path).execute("SELECT count(*), sum(x) FROM t").fetchone()
restore(restored, f"file://{work}/backup")
if rows(restored) != (100, 4950):
    sys.exit(f"restored rows {rows(restored)}, expected (100, 4950)")
init = ("--if-db-not-exists", "--if-replica-exists")  # the init container's flags
out = restore(restored, f"file://{work}/backup", *init)
if "skipped" not in out:
    sys.exit(f"restore --if-db-not-exists over an existing file did not skip: {out}")
out = restore(f"{work}/new.db", f"file://{work}/empty-replica", *init)
if "skipped" not in out or os.path.exists(f"{work}/new.db"):
    sys.exit(f"restore --if-replica-exists from an empty replica did not skip: {out}")
print("smoke: restore after SIGTERM has all 100 rows; the init-container flags skip an "
      "existing database and an empty replica")
if s3_url:
    out = restore(f"{work}/from-s3.db", s3_url, *init)
    if '"restored"' not in out or rows(f"{work}/from-s3.db") != (100, 4950):
        sys.exit(f"init-container restore from S3 did not restore all rows: {out}")
    print("smoke: S3 replica with credentials from the environment; the init-container "
          "restore from its URL has all 100 rows")
shutil.rmtree(work)
print("smoke: ok")
PY
smoke_env=()
if [ -n "${REPLICAD_SMOKE_S3_URL:-}" ]; then
    smoke_env=(--env "SMOKE_S3_URL=$REPLICAD_SMOKE_S3_URL"
        --env "AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:?needed with REPLICAD_SMOKE_S3_URL}"
        --env "AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:?needed with REPLICAD_SMOKE_S3_URL}")
    say "smoke test also replicates to $REPLICAD_SMOKE_S3_URL"
fi
t=$SECONDS
# --network host: the smoke test's S3 server listens on this host's loopback.
timeout 300 "${BUILDAH[@]}" run --network host "${smoke_env[@]}" "$ctr" -- \
    /opt/replicad/bin/python -c "$SMOKE" "$HEALTHCHECK" \
    || fail "smoke test inside the image"
say "smoke test passed in $(elapsed "$t")"

# ---- 5. done ----------------------------------------------------------------------------------
step "5/5 done"
size=$("${BUILDAH[@]}" images --noheading --format '{{.Size}}' "$TAG" | head -1)
say "OK: $TAG ($size, BASE=$BASE, isolation $ISOLATION), $version, total $(elapsed "$START")"
