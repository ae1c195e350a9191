# Nomad agent configuration for local tests, merged over the defaults of
# `nomad agent -dev` (server + client in one process, in-memory state,
# bound to 127.0.0.1 on interface lo, datacenter dc1, region global):
#
#   nomad agent -dev -config nomad/agent-dev.hcl
#
# Run it as root (tests/e2e/nomad/nomad-dev.sh does): with Nomad 1.6 the
# docker driver reports "Driver must run as root" otherwise on cgroup v2, and
# the slot-agent jobs run their agents as root.
#
# Written for Nomad 1.6.3 (tests/e2e/nomad/build-nomad.sh).

# Never call checkpoint.hashicorp.com (no traffic off this machine).
disable_update_check = true

log_level = "INFO"

client {
  # No artifact downloads or registry traffic are expected; keep the alloc
  # GC quick so stopped test jobs leave little behind.
  gc_interval = "1m"
}

# raw_exec runs the static slot-agent binary and `apptainer exec` directly
# on the host. Dev mode enables it already through the legacy option
# driver.raw_exec.enable; the plugin block makes it explicit.
plugin "raw_exec" {
  config {
    enabled = true
  }
}

plugin "docker" {
  config {
    # Dev mode sets driver.docker.volumes, which the docker plugin ignores:
    # absolute host paths in `volumes` need this.
    volumes {
      enabled = true
    }

    # slot-agent needs no privileged container.
    allow_privileged = false

    # Images are built locally (images/build.sh docker; there is no
    # registry): never delete them. With the default gc.image = true Nomad
    # removes an unused image 3 minutes after its last container stops.
    gc {
      image = false
      # Remove a task's container when the task stops (the default).
      container = true
    }
  }
}

# Dev mode looks for a Consul agent on 127.0.0.1:8500. There is none here;
# do not try to register services or join through it.
consul {
  auto_advertise   = false
  server_auto_join = false
  client_auto_join = false
}
