#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the sweep tests (`make test` calls `start`).
# Installs Debian's slurm-wlm + munge when missing and we are root; otherwise says why it cannot.
# Usage: scripts/slurm_local.sh start|stop|status
set -u
cmd=${1:-start}
log() { echo "slurm_local: $*" >&2; }

install_if_missing() {
  command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    log "slurm-wlm is not installed and this is not a root Debian machine: SLURM tests will skip"
    return 1
  fi
  log "installing slurm-wlm + munge (Debian packages)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge) >/tmp/slurm_local_install.log 2>&1 \
    || { log "apt-get install failed (see /tmp/slurm_local_install.log): SLURM tests will skip"; return 1; }
}

write_config() {
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=id2face-local
SlurmctldHost=${host}
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
MinJobAge=600
KillWait=10
NodeName=${host} CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
}

start_munge() {
  pgrep -x munged >/dev/null && return 0
  mkdir -p /etc/munge /var/log/munge /var/lib/munge /run/munge
  [ -s /etc/munge/munge.key ] || mungekey --create >/dev/null 2>&1 || mungekey -c
  chown -R munge:munge /etc/munge /var/log/munge /var/lib/munge /run/munge 2>/dev/null
  chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
  su -s /bin/sh munge -c munged 2>/dev/null || runuser -u munge -- munged
}

case "$cmd" in
  start)
    if sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mix|alloc'; then log "already up"; exit 0; fi
    install_if_missing || exit 1
    write_config
    start_munge || { log "munged did not start"; exit 1; }
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    for _ in $(seq 1 30); do
      if sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mix|alloc'; then log "up: $(sinfo -h -o '%P %D %T' | head -1)"; exit 0; fi
      scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1
      sleep 1
    done
    log "slurmd did not become idle (see /var/log/slurm/)"; exit 1 ;;
  stop)
    pkill -x slurmd; pkill -x slurmctld; pkill -x munged; exit 0 ;;  # all that start started
  status)
    sinfo ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
