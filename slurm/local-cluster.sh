#!/usr/bin/env bash
# A real single-node SLURM for the cluster tests (docs/environment.md's recipe), run as root.
#   slurm/local-cluster.sh install   apt-get the Debian packages (slurmctld, slurmd, client, munge)
#   slurm/local-cluster.sh start DIR write DIR/slurm.conf, start munged (unless running), slurmctld, slurmd;
#                                    then `export SLURM_CONF=DIR/slurm.conf` for every client
#   slurm/local-cluster.sh stop DIR  shut SLURM down and stop munged
set -euo pipefail

install() {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
}

start() {
    local dir=$1 host cpus mem
    mkdir -p "$dir"/{state,spool,log} /run/munge
    dir=$(cd "$dir" && pwd)
    host=$(hostname -s)
    cpus=8  # more task slots than cores, as docs/environment.md advises (with config_overrides)
    mem=$(( $(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p') * 9 / 10 ))
    cat >"$dir/slurm.conf" <<CONF
ClusterName=ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MinJobAge=4
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    chown munge:munge /run/munge
    pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged  # pid file: /run/munge/munged.pid
    munge -n | unmunge >/dev/null
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -i
    slurmd -N "$host"
    for _ in $(seq 60); do
        [ "$(sinfo -h -o %t 2>/dev/null)" = idle ] && { echo "SLURM is up: export SLURM_CONF=$SLURM_CONF"; return; }
        sleep 0.5
    done
    echo "SLURM node did not become idle; see $dir/log/" >&2
    sinfo >&2 || true
    return 1
}

stop() {
    local dir
    dir=$(cd "$1" && pwd)
    SLURM_CONF=$dir/slurm.conf scontrol shutdown >/dev/null 2>&1 || true
    [ -f /run/munge/munged.pid ] && kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
}

"$@"
