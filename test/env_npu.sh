#!/bin/bash
# Ascend runtime environment, sourced by the launchers only where the Ascend toolkit is installed
# (ASCEND_HOME, default /usr/local/Ascend). Safe to source elsewhere: it then only sets variables.
install_path=${ASCEND_HOME:-/usr/local/Ascend}

if [ -f "${install_path}/ascend-toolkit/set_env.sh" ]; then
    # CANN >= 5: the toolkit's own script sets PATH, LD_LIBRARY_PATH, PYTHONPATH and ASCEND_OPP_PATH
    source "${install_path}/ascend-toolkit/set_env.sh"
elif [ -f "${install_path}/nnae/set_env.sh" ]; then
    source "${install_path}/nnae/set_env.sh"
elif [ -d "${install_path}/ascend-toolkit/latest" ]; then
    toolkit=${install_path}/ascend-toolkit/latest
    export LD_LIBRARY_PATH=${toolkit}/fwkacllib/lib64:${install_path}/driver/lib64/common:${install_path}/driver/lib64/driver:${install_path}/add-ons:${LD_LIBRARY_PATH:-}
    export PATH=${toolkit}/fwkacllib/ccec_compiler/bin:${toolkit}/fwkacllib/bin:${PATH}
    export PYTHONPATH=${toolkit}/fwkacllib/python/site-packages:${PYTHONPATH:-}
    export ASCEND_OPP_PATH=${toolkit}/opp
    export ASCEND_AICPU_PATH=${toolkit}
fi
if [ -d "${install_path}/driver/lib64" ]; then
    export LD_LIBRARY_PATH=${install_path}/driver/lib64/common:${install_path}/driver/lib64/driver:${LD_LIBRARY_PATH:-}
fi

# Host logs not on stdout, errors only, no event logs (0: off, 1: on; levels 0 debug .. 3 error)
export ASCEND_SLOG_PRINT_TO_STDOUT=0
export ASCEND_GLOBAL_LOG_LEVEL=3
export ASCEND_GLOBAL_EVENT_ENABLE=0
# Task queue and combined/PTCopy optimisations of the Ascend adapter
export TASK_QUEUE_ENABLE=1
export PTCOPY_ENABLE=1
export COMBINED_ENABLE=1
export DYNAMIC_OP="ADD#MUL"
export BMMV2_ENABLE=1
# HCCL: no IP whitelist; bind to the first address of this host
export HCCL_WHITELIST_DISABLE=1
HCCL_IF_IP=$(hostname -I 2>/dev/null | awk '{print $1}')
[ -n "${HCCL_IF_IP}" ] && export HCCL_IF_IP

# Device-side logs: errors only, no events (only where the driver tool exists)
msnpureport=${install_path}/driver/tools/msnpureport
if [ -x "${msnpureport}" ]; then
    for device in 0 1 2 3 4 5 6 7; do
        "${msnpureport}" -g error -d ${device} >/dev/null 2>&1
    done
    "${msnpureport}" -e disable >/dev/null 2>&1
fi
