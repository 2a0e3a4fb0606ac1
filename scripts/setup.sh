# Sourced by app.sh and test.sh: create the virtualenv ($TSHSR_VENV, default .venv) and install
# this package into it, editable, with the demo, training and test extras, at the versions in
# constraints.txt (a no-op when everything is already installed). Sets $VENV.
VENV="${TSHSR_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check -c constraints.txt -e ".[app,train,test]"
