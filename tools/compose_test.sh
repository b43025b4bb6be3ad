#!/usr/bin/env bash
# make test-compose: build the images and run the compose stack for real, with testcontainers, on a
# Debian machine with root and no container registry. Nothing leaves 127.0.0.1: the engine is this
# script's own (no bridge, no iptables, registry traffic pointed at a closed loopback port) and the
# stack runs on the host's network with every port bound to 127.0.0.1 (compose/cpu.yml).
#
# Stages, each timed (printed at the end and kept in $CACHE/timings.tsv):
#   packages  Debian's docker.io and debootstrap, when missing (no service is started by the install)
#   compose   a Compose v2 CLI (2.24+): one already installed, else a Debian package apt offers
#             (docker-compose v2 or docker-compose-plugin, apt-cache policy says), else - bookworm's
#             docker-compose is 1.29, which rejects the compose files - Debian trixie's docker-compose
#             package, downloaded by apt (checked against the archive's signed index) into the cache
#             and unpacked there (the host's dpkg database is untouched)
#   engine    dockerd with its data root and socket under the cache
#   rootfs    debootstrap --variant=minbase bookworm with python3, tarred into the cache
#   base      docker import of that tarball
#   redis     docker/redis.Dockerfile on the base, from Debian's redis-server packages
#   wheels    pip download of every dependency, for the image's Python (bookworm's 3.11)
#   image     docker/Dockerfile on the base with PIP_FROM=wheels, without any network
#   test      pytest tests/test_compose_stack.py (testcontainers' DockerCompose drives compose)
# The engine is stopped at the end, on failure too. Everything that can be reused is cached in $CACHE
# (default ~/.cache/luna-stack-ci, outside the repository): the rootfs tarball, the .debs, the wheels,
# the Compose CLI and the engine's data root with its images and build cache. `rm -rf` it to start cold.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${LUNA_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/luna-stack-ci}
VENV=${VENV:-$REPO/.venv}
SUITE=bookworm
ROOTFS_PACKAGES=python3,python3-venv,passwd
COMPOSE_SUITE=trixie # the first Debian release whose docker-compose is v2
COMPOSE_MIN=2.24     # the first with !reset (compose/cpu.yml)
BASE_IMAGE=luna-ci-base:$SUITE
REDIS_IMAGE=luna-stack-redis:ci
SERVICE_IMAGE=luna-stack:ci
# bookworm's Python, for pip download (markers are evaluated against the host's Python, see below).
IMAGE_PYTHON=3.11.2
DOCKER=/usr/bin/docker # Debian's CLI, the engine's own version; it builds with BuildKit without buildx
RUN_DIR=$CACHE/run
SOCKET=$RUN_DIR/docker.sock
PIDFILE=$RUN_DIR/dockerd.pid
TIMINGS=$CACHE/timings.tsv
WHL=$REPO/.whl # the build context's wheels folder (docker/Dockerfile, PIP_FROM=wheels)
WHL_MARK=$WHL/.made-by-make-test-compose
export DOCKER_BUILDKIT=1 DEBIAN_FRONTEND=noninteractive

log() { printf '== %s\n' "$*" >&2; }
die() {
	printf 'make test-compose: %s\n' "$*" >&2
	exit 1
}

declare -a STAGE_LINES=()
stage() { # stage NAME COMMAND...: run and time one stage
	local name=$1 start ms
	shift
	log "$name"
	start=$(date +%s%N)
	"$@"
	ms=$((($(date +%s%N) - start) / 1000000))
	STAGE_LINES+=("$(printf '%s\t%d.%d' "$name" $((ms / 1000)) $((ms % 1000 / 100)))")
}

LOGS=$CACHE/logs
logged() { # logged NAME COMMAND...: output to $LOGS/NAME.log, its tail shown when the command fails
	mkdir -p "$LOGS"
	"${@:2}" >"$LOGS/$1.log" 2>&1 || {
		tail -40 "$LOGS/$1.log" >&2
		die "$1 failed (log: $LOGS/$1.log)"
	}
}

[[ $EUID -eq 0 ]] || die "needs root: it installs Debian packages and runs its own Docker engine"
command -v apt-get >/dev/null || die "needs a Debian machine (apt-get)"
[[ -x $VENV/bin/pytest ]] || die "no $VENV: run make venv first"
mkdir -p "$CACHE"
exec 9>"$CACHE/lock"
# One run at a time per cache (one engine, one data root); another one waits its turn, boundedly.
flock -w 900 9 || die "another make test-compose has held $CACHE/lock for 15 minutes"

# ----------------------------------------------------------------------------------------- packages

APT_UPDATED=
apt_update_once() {
	[[ -n $APT_UPDATED ]] || apt-get update -qq
	APT_UPDATED=1
}

install_packages() {
	local missing=() pkg
	for pkg in docker.io debootstrap; do
		dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
	done
	((${#missing[@]})) || return 0
	apt_update_once
	# Without systemd, the package's scripts would start the system's dockerd (with a bridge and
	# iptables rules): policy-rc.d forbids that for the install.
	local made_policy=
	if [[ ! -e /usr/sbin/policy-rc.d ]]; then
		printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
		chmod +x /usr/sbin/policy-rc.d
		made_policy=1
	fi
	local rc=0
	logged apt-install \
		apt-get install -y -q --no-install-recommends "${missing[@]}" || rc=$?
	[[ -z $made_policy ]] || rm -f /usr/sbin/policy-rc.d
	return "$rc"
}

# The Debian archive (and security archive) this machine's apt already uses, so a local mirror serves
# as well as the public one; LUNA_CI_MIRROR and LUNA_CI_SECURITY_MIRROR override them.
apt_uri() { # apt_uri SUITE: the URI apt fetches SUITE/main from, if it does
	apt-cache policy 2>/dev/null | awk -v want="$1/main" '$3 == want {print $2; exit}'
}
MIRROR=
SECURITY_MIRROR=
find_mirrors() {
	MIRROR=${LUNA_CI_MIRROR:-$(apt_uri "$SUITE")}
	if [[ -z $MIRROR ]]; then
		apt_update_once
		local codename
		# shellcheck source=/dev/null
		codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
		MIRROR=$(apt_uri "$SUITE")
		[[ -n $MIRROR || -z $codename ]] || MIRROR=$(apt_uri "$codename")
	fi
	[[ -n $MIRROR ]] || die "apt has no Debian archive configured: set LUNA_CI_MIRROR to one"
	SECURITY_MIRROR=${LUNA_CI_SECURITY_MIRROR:-$(apt_uri "$SUITE-security")}
}

# apt with its own sources and state under $CACHE/apt/NAME: for downloads only, never installs.
private_apt() { # private_apt NAME "SUITES" apt-get-arguments...
	local dir=$CACHE/apt/$1 suites=$2
	shift 2
	mkdir -p "$dir/lists/partial" "$dir/archives/partial" "$dir/prefs"
	touch "$dir/status"
	: >"$dir/sources.list"
	local suite uri
	for suite in $suites; do
		uri=$MIRROR
		if [[ $suite == *-security ]]; then
			uri=$SECURITY_MIRROR
			[[ -n $uri ]] || continue # no security archive configured: main and updates only
		fi
		echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri $suite main" >>"$dir/sources.list"
	done
	apt-get -q -o Dir::Etc::SourceList="$dir/sources.list" -o Dir::Etc::SourceParts=- \
		-o Dir::Etc::Preferences=- -o Dir::Etc::PreferencesParts="$dir/prefs" \
		-o Dir::State::Lists="$dir/lists" -o Dir::State::status="${PRIVATE_STATUS:-$dir/status}" \
		-o Dir::Cache="$dir/cache" -o Dir::Cache::archives="$dir/archives" \
		-o APT::Sandbox::User=root -o Debug::NoLocking=1 "$@"
}

COMPOSE_DIR=$CACHE/compose
DOCKER_CONFIG_DIR=$CACHE/docker-config
PLUGIN_DIRS="/usr/libexec/docker/cli-plugins /usr/lib/docker/cli-plugins /usr/local/lib/docker/cli-plugins"

new_enough() { # new_enough VERSION: a Debian or Compose version (epoch, v, revision dropped) >= COMPOSE_MIN
	local v=${1#*:}
	v=${v#v}
	printf '%s\n%s\n' "$COMPOSE_MIN" "${v%%[-+~]*}" | sort -V -C
}

installed_compose() { # a Compose v2 plugin of the system's, new enough
	local dir
	for dir in $PLUGIN_DIRS; do
		[[ -x $dir/docker-compose ]] && new_enough "$("$dir/docker-compose" version --short 2>/dev/null)" &&
			echo "$dir/docker-compose" && return 0
	done
	return 1
}

# Install the Debian package that provides a new enough plugin, where this machine's apt offers one
# (its package lists as they are: the packages stage updated them when it had to install).
apt_compose() {
	local pkg candidate
	for pkg in docker-compose-plugin docker-compose; do
		candidate=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
		if [[ -z $candidate || $candidate == "(none)" ]] || ! new_enough "$candidate"; then
			continue
		fi
		logged apt-compose apt-get install -y -q --no-install-recommends "$pkg"
		return 0
	done
	return 1
}

get_compose() {
	local bin source
	if bin=$(installed_compose); then
		source="installed"
	elif apt_compose && bin=$(installed_compose); then
		source="a Debian package of this machine's apt"
	else
		bin=$COMPOSE_DIR/usr/libexec/docker/cli-plugins/docker-compose
		source="Debian $COMPOSE_SUITE's docker-compose, unpacked in the cache"
		if [[ ! -x $bin ]]; then
			logged apt-compose private_apt "$COMPOSE_SUITE" "$COMPOSE_SUITE" update
			local tmp
			tmp=$(mktemp -d "$CACHE/compose-deb.XXXXXX")
			(cd "$tmp" && logged apt-compose private_apt "$COMPOSE_SUITE" "$COMPOSE_SUITE" download docker-compose)
			rm -rf "$COMPOSE_DIR"
			dpkg-deb -x "$tmp"/docker-compose_*.deb "$COMPOSE_DIR"
			rm -rf "$tmp"
		fi
	fi
	local version
	version=$("$bin" version --short)
	new_enough "$version" || die "docker-compose $version is older than $COMPOSE_MIN"
	mkdir -p "$DOCKER_CONFIG_DIR/cli-plugins"
	ln -sf "$bin" "$DOCKER_CONFIG_DIR/cli-plugins/docker-compose"
	log "Compose $version ($source)"
}

# ------------------------------------------------------------------------------------------- engine

docker_() { DOCKER_HOST=unix://$SOCKET DOCKER_CONFIG=$DOCKER_CONFIG_DIR "$DOCKER" "$@"; }

engine_pid() { # the pid of this cache's dockerd, if one runs
	local pid
	pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
	[[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "--data-root $CACHE/engine " &&
		echo "$pid"
}

unmount_leftovers() { # what a stopped (or killed) dockerd leaves mounted: its netns file, overlays
	awk '{print $2}' /proc/self/mounts | grep -E "^($RUN_DIR|$CACHE/engine)/" | sort -r |
		xargs -r umount -l 2>/dev/null || true
}

stop_engine() {
	local pid
	pid=$(engine_pid) || { unmount_leftovers; return 0; }
	# All containers of this engine are this script's: none may start again with the next engine.
	docker_ ps -aq | xargs -r "$DOCKER" -H "unix://$SOCKET" rm -f >/dev/null 2>&1 || true
	docker_ volume prune -f >/dev/null 2>&1 || true
	kill -TERM "$pid"
	for _ in $(seq 1 60); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.5
	done
	kill -KILL "$pid" 2>/dev/null || true
	unmount_leftovers
}

start_engine() {
	stop_engine # one left by a run that was killed
	rm -rf "$RUN_DIR"
	mkdir -p "$RUN_DIR" "$CACHE/engine"
	# HTTP(S)_PROXY: a pull (there should be none) goes to a closed port on 127.0.0.1, not to a registry.
	env HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY= \
		setsid dockerd --data-root "$CACHE/engine" --exec-root "$RUN_DIR/exec" --pidfile "$PIDFILE" \
		--host "unix://$SOCKET" --bridge=none --iptables=false --ip-forward=false --ip-masq=false \
		--userland-proxy=false --log-level=warn </dev/null >"$RUN_DIR/dockerd.log" 2>&1 &
	for _ in $(seq 1 120); do
		docker_ version >/dev/null 2>&1 && break
		sleep 0.25
	done
	docker_ version >/dev/null 2>&1 || { tail -20 "$RUN_DIR/dockerd.log" >&2; die "dockerd did not start"; }
	docker_ ps -aq | xargs -r "$DOCKER" -H "unix://$SOCKET" rm -f >/dev/null
}

# ------------------------------------------------------------------------------------------- images

ROOTFS_KEY=$(echo "$SUITE minbase $ROOTFS_PACKAGES" | sha256sum | cut -c1-12)
ROOTFS_TAR=$CACHE/rootfs/$SUITE-minbase-$ROOTFS_KEY.tar

label_of() { docker_ image inspect -f "{{index .Config.Labels \"$2\"}}" "$1" 2>/dev/null || true; }

build_rootfs() {
	[[ -s $ROOTFS_TAR ]] && return 0
	local dir
	rm -rf "$CACHE/rootfs"
	mkdir -p "$CACHE/rootfs"
	dir=$(mktemp -d "$CACHE/rootfs/tree.XXXXXX")
	logged debootstrap debootstrap --variant=minbase --include="$ROOTFS_PACKAGES" "$SUITE" "$dir" "$MIRROR"
	rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/cache/apt/*.bin "$dir"/var/lib/apt/lists/*
	tar --numeric-owner -C "$dir" -cf "$ROOTFS_TAR.part" .
	mv "$ROOTFS_TAR.part" "$ROOTFS_TAR"
	rm -rf "$dir"
}

import_base() {
	[[ $(label_of "$BASE_IMAGE" org.luna-stack.rootfs) == "$ROOTFS_KEY" ]] && return 0
	docker_ import --change "LABEL org.luna-stack.rootfs=$ROOTFS_KEY" --change 'CMD ["/bin/bash"]' \
		"$ROOTFS_TAR" "$BASE_IMAGE" >/dev/null
}

build_redis() {
	local debs=$CACHE/redis-debs/$ROOTFS_KEY
	if [[ ! -e $debs/.complete ]]; then
		rm -rf "$CACHE/redis-debs"
		mkdir -p "$debs"
		# Resolved against the base's own package list, so exactly what the base lacks is fetched.
		tar -xOf "$ROOTFS_TAR" ./var/lib/dpkg/status >"$CACHE/redis-debs/status"
		local suites="$SUITE $SUITE-updates $SUITE-security"
		logged apt-redis private_apt "$SUITE" "$suites" update
		rm -f "$CACHE/apt/$SUITE"/archives/*.deb
		PRIVATE_STATUS=$CACHE/redis-debs/status logged apt-redis private_apt "$SUITE" "$suites" \
			install -y --download-only --no-install-recommends redis-server
		mv "$CACHE/apt/$SUITE"/archives/*.deb "$debs/"
		touch "$debs/.complete"
	fi
	logged build-redis docker_ build --progress=plain --network=none \
		--build-arg "BASE_IMAGE=$BASE_IMAGE" -f "$REPO/docker/redis.Dockerfile" -t "$REDIS_IMAGE" "$debs"
}

# Every dependency the image installs (docker/Dockerfile reads the same lists from pyproject.toml),
# with torch's CPU build. pip evaluates environment markers against the host's Python, not the
# image's: redis-py needs async-timeout on Pythons before 3.11.3 (bookworm has 3.11.2), so it is named.
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' "$REPO/docker/Dockerfile")
wheel_requirements() {
	"$VENV/bin/python" - "$REPO/pyproject.toml" <<-'EOF'
		import sys, tomllib
		p = tomllib.load(open(sys.argv[1], "rb"))
		print("\n".join(p["project"]["dependencies"] + p["project"]["optional-dependencies"]["server"]
		                + p["build-system"]["requires"]))
	EOF
	echo "torch==$TORCH_VERSION+cpu"
	echo "async-timeout>=4.0.3"
}

WHEELS=
download_wheels() {
	local requirements key platforms=() v
	requirements=$(wheel_requirements)
	key=$(printf '%s\n%s\n' "$IMAGE_PYTHON" "$requirements" | sha256sum | cut -c1-12)
	WHEELS=$CACHE/wheels/$key
	[[ -e $WHEELS/.complete ]] && return 0
	rm -rf "$CACHE/wheels"
	mkdir -p "$WHEELS"
	for v in $(seq 5 36); do platforms+=(--platform "manylinux_2_${v}_x86_64"); done
	# shellcheck disable=SC2086 # one requirement per word
	logged pip-download "$VENV/bin/pip" download --disable-pip-version-check -d "$WHEELS" \
		--only-binary=:all: --python-version "$IMAGE_PYTHON" --implementation cp \
		--abi "cp$(echo "$IMAGE_PYTHON" | cut -d. -f1,2 | tr -d .)" "${platforms[@]}" \
		--platform manylinux2014_x86_64 $requirements
	printf '%s\n' "$requirements" >"$WHEELS/requirements.txt"
	touch "$WHEELS/.complete"
}

remove_whl() { [[ ! -e $WHL_MARK ]] || rm -rf "$WHL"; }

build_image() {
	# The wheels are linked into .whl/ (git-ignored) for the build only: docker/Dockerfile bind-mounts
	# that folder of the build context into the one RUN step that installs them.
	remove_whl
	[[ ! -e $WHL ]] || die "$WHL exists (wheels of your own?): move it away, this build fills it"
	mkdir "$WHL"
	touch "$WHL_MARK"
	cp -l "$WHEELS"/*.whl "$WHL/" 2>/dev/null || cp "$WHEELS"/*.whl "$WHL/"
	logged build-image docker_ build --progress=plain --network=none \
		--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg PIP_FROM=wheels \
		-f "$REPO/docker/Dockerfile" -t "$SERVICE_IMAGE" "$REPO"
	remove_whl
	# What earlier builds left behind: untagged images, and build cache not used for a week.
	docker_ image prune -f >/dev/null
	docker_ builder prune -f --filter until=168h >/dev/null
}

run_tests() {
	rm -f "$CACHE/test-timings.json" "$LOGS/stack.log"
	mkdir -p "$LOGS"
	# The stack's models, written by the project's fixture generator, are made by the test itself.
	env DOCKER_HOST="unix://$SOCKET" DOCKER_CONFIG="$DOCKER_CONFIG_DIR" TESTCONTAINERS_RYUK_DISABLED=true \
		LUNA_DOCKER_CLI="$DOCKER" LUNA_COMPOSE_IMAGE="$SERVICE_IMAGE" LUNA_COMPOSE_REDIS_IMAGE="$REDIS_IMAGE" \
		LUNA_COMPOSE_REQUIRED=1 LUNA_COMPOSE_TIMINGS="$CACHE/test-timings.json" \
		LUNA_COMPOSE_LOGS="$LOGS/stack.log" \
		"$VENV/bin/pytest" -q -m compose "$REPO/tests/test_compose_stack.py" -p no:cacheprovider
}

report() {
	local rc=$1
	trap - EXIT
	if engine_pid >/dev/null; then
		local sizes
		sizes=$(docker_ image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' 2>/dev/null | sort || true)
		stage stop stop_engine
		[[ -z $sizes ]] || printf 'image sizes:\n%s\n' "$sizes" >&2
	fi
	((rc == 0)) || printf 'logs: %s (the stack: stack.log, the engine: %s)\n' "$LOGS" "$RUN_DIR/dockerd.log" >&2
	remove_whl
	STAGE_LINES+=("$(printf 'total\t%d' "$(($(date +%s) - total_start))")")
	if ((${#STAGE_LINES[@]})); then
		printf '%s\n' "${STAGE_LINES[@]}" >"$TIMINGS"
		printf 'stage times (s):\n' >&2
		printf '  %s\n' "${STAGE_LINES[@]}" >&2
	fi
	[[ ! -s $CACHE/test-timings.json ]] || printf 'in the test (s): %s\n' "$(cat "$CACHE/test-timings.json")" >&2
	exit "$rc"
}
total_start=$(date +%s)
trap 'report $?' EXIT

find_mirrors
stage packages install_packages
stage compose get_compose
stage engine start_engine
stage rootfs build_rootfs
stage base import_base
stage redis build_redis
stage wheels download_wheels
stage image build_image
stage test run_tests
