# Source on the GPU machine (device tool) from the repository root: the carried wheels (.devwhl; .whl is
# the compose build's), redis-server and its libraries (.devbin), this tree importable as luna_stack.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .devwhl/*.whl || return 1
mkdir -p /tmp/pkg && ln -sfn "$PWD/services" /tmp/pkg/luna_stack
export PYTHONPATH="/tmp/pkg:/tmp/site:$PWD" PATH="$PWD/.devbin:$PATH" LD_LIBRARY_PATH="$PWD/.devbin" \
    HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
