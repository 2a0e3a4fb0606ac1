# Sourced by app.sh and test.sh: create the virtualenv ($TSHSR_VENV, default .venv) and install
# requirements.txt into it (a no-op when everything is already installed). Sets $VENV.
VENV="${TSHSR_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.txt
