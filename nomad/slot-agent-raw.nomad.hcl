# The static slot-agent binary under raw_exec, one agent per allocation.
#
#   nomad job run -var agent_bin=$PWD/build/slot-agent -var token=SECRET \
#     nomad/slot-agent-raw.nomad.hcl
#
# raw_exec runs the agent directly on the host as the user Nomad runs as
# (root under tests/e2e/nomad/nomad-dev.sh; the agent then runs each slot as
# its own uid). The agent binds the allocation's dynamic host port (label
# "agent", no `to`: raw_exec maps no ports) on the client's address; reach
# it at AllocatedResources.Shared.Ports[label=agent].HostIP:Value. The
# token reaches the agent as a file, secrets/token, written by the template
# block (see var.token). raw_exec enforces no memory limit: var.memory only
# reserves. See nomad/README.md.

variable "job_id" {
  type        = string
  default     = "slot-agents-raw"
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

variable "agent_bin" {
  type        = string
  description = "Absolute path of the static slot-agent binary on every client (e.g. the repo's build/slot-agent). No default."
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
  description = "Memory in MB to reserve (raw_exec does not enforce it)."
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

job "slot-agents-raw" {
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
      # No `to`: with raw_exec NOMAD_PORT_agent must be the host port.
      port "agent" {}
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
      driver = "raw_exec"

      config {
        command = var.agent_bin
        # ${NOMAD_*} are interpolated by Nomad when the task starts; under
        # raw_exec they are absolute host paths.
        args = concat(
          [
            "--listen", "tls:${NOMAD_IP_agent}:${NOMAD_PORT_agent}",
            "--tls-cert", "${NOMAD_SECRETS_DIR}/tls.pem",
            "--tls-key", "${NOMAD_SECRETS_DIR}/tls.key",
            "--tls-ca", "${NOMAD_SECRETS_DIR}/ca.pem",
            "--token-file", "${NOMAD_SECRETS_DIR}/token",
            "--slots", format("%d", var.slots),
            "--data-dir", "${NOMAD_ALLOC_DIR}/data",
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
