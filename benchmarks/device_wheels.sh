# Sourced by the device scripts: install the carried wheels in .whl/ (no index, no deps) into
# /tmp/site and put it and the repo on PYTHONPATH. Needs PY (the Python to use) and the repo
# root as the working directory.
install_carried_wheels() {
  if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
  else
    export PYTHONPATH=$PWD
  fi
}
