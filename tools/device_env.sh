# Source on the GPU machine (device tool) from the repository root: the carried wheels (.whl), redis-server
# and its libraries (.devbin), and this tree importable as luna_stack without an install.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
mkdir -p /tmp/pkg && ln -sfn "$PWD/services" /tmp/pkg/luna_stack
export PYTHONPATH="/tmp/pkg:/tmp/site:$PWD" PATH="$PWD/.devbin:$PATH" LD_LIBRARY_PATH="$PWD/.devbin" \
    HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
