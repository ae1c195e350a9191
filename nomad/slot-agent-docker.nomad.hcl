# slot-agent in Docker containers, one agent per allocation.
#
#   nomad job run -var image=slot-agent:dev -var token=SECRET \
#     nomad/slot-agent-docker.nomad.hcl
#
# Each allocation gets a dynamic host port (label "agent") that Docker
# publishes to port var.agent_port inside the container; reach the agent at
# AllocatedResources.Shared.Ports[label=agent].HostIP:Value of the
# allocation. The token reaches the agent as a file, secrets/token, written
# by the template block (see var.token). See nomad/README.md.

variable "job_id" {
  type        = string
  default     = "slot-agents-docker"
  description = "Job ID and name."
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

variable "count" {
  type        = number
  default     = 1
  description = "Number of agents (allocations)."
}

variable "image" {
  type        = string
  default     = "slot-agent:dev"
  description = "Docker image with slot-agent. Use a tag other than latest for local images: latest (or no tag) is always pulled."
}

variable "agent_port" {
  type        = number
  default     = 7070
  description = "Port the agent listens on inside the container (the port's `to`)."
}

variable "slots" {
  type    = number
  default = 10
}

variable "cpu" {
  type        = number
  default     = 500
  description = "CPU shares in MHz."
}

variable "memory" {
  type        = number
  default     = 512
  description = "Memory in MB, for the agent and everything its slots run."
}

variable "token" {
  type        = string
  default     = ""
  description = "Agent token. Empty: read it from the Nomad Variable nomad/jobs/<job_id>, key token (nomad var put nomad/jobs/<job_id> token=...)."
}

variable "tls_cert" {
  type        = string
  default     = ""
  description = "The agent's certificate (PEM; CN = the agent id, serverAuth), issued by the controller's CA. Empty: read it from the Nomad Variable nomad/jobs/<job_id>, key tls_cert."
}

variable "tls_key" {
  type        = string
  default     = ""
  description = "The agent's private key (PEM). Empty: read it from the Nomad Variable nomad/jobs/<job_id>, key tls_key."
}

variable "tls_ca" {
  type        = string
  default     = ""
  description = "The CA the controller's client certificate chains to (PEM). Empty: read it from the Nomad Variable nomad/jobs/<job_id>, key tls_ca."
}

variable "seccomp_profile" {
  type        = string
  default     = ""
  description = "Path ON THE CLIENT NODE of images/seccomp-slot.json (e.g. /etc/slot-agent/seccomp-slot.json): Docker's default seccomp profile plus what a slot's box needs, so slots get namespaces without privileges (docs/docker-seccomp.md). Empty: Docker's default profile (no boxes, a uid per slot)."
}

variable "pids_limit" {
  type        = number
  default     = 4096
  description = "Processes of the whole container (0: no limit). With seccomp_profile slots run as uid 0 in their boxes, which RLIMIT_NPROC does not limit."
}

variable "slot_disk" {
  type        = string
  default     = ""
  description = "Disk budget of each slot (the agent's --slot-disk: bytes, or 64M, 2G; 0 or off: none). Empty: the agent's default. The controller sets it from the profile's slot_disk."
}

variable "slot_inodes" {
  type        = string
  default     = ""
  description = "Files and directories each slot may have (the agent's --slot-inodes: a count, or 500K; 0 or off: none). Empty: the agent's default. The controller sets it from the profile's slot_inodes."
}

variable "extra_args" {
  type        = list(string)
  default     = []
  description = "More slot-agent options, e.g. [\"--isolation\", \"required\"]."
}

variable "meta" {
  type    = map(string)
  default = {}
}

locals {
  # A non-empty var.token is written into the job as it is (the job spec,
  # readable with read-job, then holds it; it must not contain "{{").
  # Otherwise the task reads the Nomad Variable of the job at start; the
  # token then never appears in the job spec.
  token_template = var.token != "" ? var.token : "{{ with nomadVar \"nomad/jobs/${var.job_id}\" }}{{ .token }}{{ end }}"
  # The same for the agent's TLS files (a key in the job spec is as
  # readable as the token; use the Nomad Variable to keep it out).
  tls_cert_template = var.tls_cert != "" ? var.tls_cert : "{{ with nomadVar \"nomad/jobs/${var.job_id}\" }}{{ .tls_cert }}{{ end }}"
  tls_key_template  = var.tls_key != "" ? var.tls_key : "{{ with nomadVar \"nomad/jobs/${var.job_id}\" }}{{ .tls_key }}{{ end }}"
  tls_ca_template   = var.tls_ca != "" ? var.tls_ca : "{{ with nomadVar \"nomad/jobs/${var.job_id}\" }}{{ .tls_ca }}{{ end }}"
}

job "slot-agents-docker" {
  id          = var.job_id
  name        = var.job_id
  type        = "service"
  datacenters = var.datacenters
  meta        = var.meta

  # No deployments: a register or scale is placed at once and never blocks
  # the next scale ("job scaling blocked due to active deployment").
  update {
    max_parallel = 0
  }

  group "agents" {
    count = var.count

    network {
      mode = "host"
      port "agent" {
        to = var.agent_port
      }
    }

    # A crashing agent is restarted in place a few times, then the
    # allocation fails and is rescheduled (on any node), without end, at
    # a growing interval.
    restart {
      attempts = 3
      interval = "5m"
      delay    = "5s"
      mode     = "fail"
    }

    reschedule {
      unlimited      = true
      delay          = "5s"
      delay_function = "exponential"
      max_delay      = "1m"
    }

    task "agent" {
      driver = "docker"

      config {
        image      = var.image
        force_pull = false
        ports      = ["agent"]
        # The driver reads the profile file on the client and sends it to
        # Docker. Where AppArmor confines containers, boxes also need
        # "apparmor=unconfined" here.
        security_opt = var.seccomp_profile != "" ? ["seccomp=${var.seccomp_profile}"] : []
        pids_limit   = var.pids_limit
        # The image's entrypoint prepends slot-agent to arguments that start
        # with "--". NOMAD_ALLOC_DIR is /alloc, NOMAD_SECRETS_DIR /secrets.
        args = concat(
          [
            "--listen", "tls:0.0.0.0:${var.agent_port}",
            "--tls-cert", "/secrets/tls.pem",
            "--tls-key", "/secrets/tls.key",
            "--tls-ca", "/secrets/ca.pem",
            "--token-file", "/secrets/token",
            "--slots", format("%d", var.slots),
            "--data-dir", "/alloc/data",
          ],
          # Empty: nothing passed, the agent's default applies.
          var.slot_disk != "" ? ["--slot-disk", var.slot_disk] : [],
          var.slot_inodes != "" ? ["--slot-inodes", var.slot_inodes] : [],
          var.extra_args,
        )
      }

      template {
        data        = local.token_template
        destination = "secrets/token"
        perms       = "0600"
        # The agent reads its token once at start.
        change_mode = "restart"
      }

      # The agent's TLS files. A renewal reaches the agent over its link
      # (op tls_renew, which rewrites these files), so a change here does
      # not restart it.
      template {
        data        = local.tls_cert_template
        destination = "secrets/tls.pem"
        perms       = "0600"
        change_mode = "noop"
      }

      template {
        data        = local.tls_key_template
        destination = "secrets/tls.key"
        perms       = "0600"
        change_mode = "noop"
      }

      template {
        data        = local.tls_ca_template
        destination = "secrets/ca.pem"
        perms       = "0600"
        change_mode = "noop"
      }

      resources {
        cpu    = var.cpu
        memory = var.memory
      }

      # The agent kills its commands on SIGTERM and exits.
      kill_timeout = "15s"
    }
  }
}
