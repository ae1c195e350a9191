# slot: the two commands a newcomer needs are `make run` and `make test`.
# Everything uses Debian's packages and Debian's /usr/bin/python3.

PY       := /usr/bin/python3
BUILD    := build
ASAN     := build-asan
DEB_PKGS := meson ninja-build pkg-config gcc clang libev-dev libmsgpack-dev libmd-dev \
            zlib1g-dev libcmocka-dev libjansson-dev libseccomp-dev python3 python3-msgpack \
            python3-pytest file tar procps clang-format util-linux busybox-static \
            libyaml-dev tmux debootstrap openssh-server openssh-client \
            libcurl4-openssl-dev libvterm-dev openssl python3-pydantic libwolfssl-dev tcpdump \
            bash-builtins

.PHONY: all deps build asan run test test-fast bench fuzz format clean images

all: build

# Installs only what is missing; needs root (or sudo) the first time.
deps:
	@missing=""; for p in $(DEB_PKGS); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "installing:$$missing"; \
	    SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(BUILD)/build.ninja:
	meson setup $(BUILD) >/dev/null

build: deps $(BUILD)/build.ninja
	meson compile -C $(BUILD)

$(ASAN)/build.ninja:
	meson setup $(ASAN) -Db_sanitize=address,undefined -Db_lundef=false -Dstatic_agent=false \
	    -Dbuildtype=debug >/dev/null

asan: deps $(ASAN)/build.ninja
	meson compile -C $(ASAN)

run: build
	@$(PY) tests/demo.py --build $(BUILD)

test: build asan
	$(PY) tests/run_all.py --build $(BUILD) --asan $(ASAN)

test-fast: build
	$(PY) tests/run_all.py --build $(BUILD) --no-asan --no-fuzz

bench: build
	tests/bench/run.sh
	$(PY) tests/bench/controller.py --build $(BUILD)
	$(PY) tests/bench/images.py --build
	$(PY) tests/bench/nomad.py
	$(PY) tests/bench/modal.py
	$(PY) tests/bench/sessions.py
	$(PY) tests/bench/trainer_compat.py --build $(BUILD)
	$(PY) tests/bench/templates.py --build $(BUILD)
	$(PY) tests/bench/disk_quota.py --build $(BUILD)
	$(PY) tests/bench/reconnect.py --build $(BUILD)
	$(PY) tests/bench/tls.py --build $(BUILD)

# The Docker images (slot-agent, slot-agent-bin) and the SIF; see images/README.md.
images: deps
	images/build.sh all

fuzz: deps
	tests/fuzz/run.sh

format:
	clang-format -i agent/*.c agent/*.h agent/ops/*.c agent/isolate/*.c agent/isolate/*.h proto/*.c proto/*.h \
	    controller/*.c controller/*.h controller/backends/*.c controller/agentctl/*.[ch] tests/unit/*.c \
	    tests/bench/*.c tests/fuzz/*.c tests/isolation/*.c

clean:
	rm -rf $(BUILD) $(ASAN)
