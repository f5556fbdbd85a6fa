#!/usr/bin/env bash
# A local Orthanc PACS with its DICOMweb plugin, for serving the app from DICOMweb (and for the PACS tests).
#   scripts/orthanc.sh start   writes $ORTHANC_DIR/orthanc.json, starts Orthanc, waits until it answers
#   scripts/orthanc.sh stop    stops the Orthanc whose PID is in $ORTHANC_DIR/orthanc.pid
#   scripts/orthanc.sh status  says whether it runs and where
# Environment: ORTHANC_DIR (storage, config, log and PID file; default .orthanc), ORTHANC_HTTP_PORT (8042),
# ORTHANC_DICOM_PORT (4242), ORTHANC_AET (SAMORA). Debian packages: orthanc orthanc-dicomweb (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${ORTHANC_DIR:-.orthanc}"
HTTP_PORT="${ORTHANC_HTTP_PORT:-8042}"
DICOM_PORT="${ORTHANC_DICOM_PORT:-4242}"
AET="${ORTHANC_AET:-SAMORA}"
ORTHANC="${ORTHANC_BIN:-$(command -v Orthanc || echo /usr/sbin/Orthanc)}"
PLUGINS="${ORTHANC_PLUGINS:-/usr/share/orthanc/plugins}"
PID_FILE="$DIR/orthanc.pid"
URL="http://127.0.0.1:$HTTP_PORT"

running() { [ -f "$PID_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; }

write_config() {
  mkdir -p "$DIR/storage"
  # Orthanc 1.10 has no bind address: RemoteAccessAllowed=false makes its HTTP server refuse every client that is
  # not on this machine, and the DICOM port accepts no C-STORE/C-FIND from modalities it does not know.
  cat > "$DIR/orthanc.json" <<EOF
{
  "Name": "samora-orthanc",
  "StorageDirectory": "$(realpath "$DIR/storage")",
  "IndexDirectory": "$(realpath "$DIR/storage")",
  "HttpPort": $HTTP_PORT,
  "DicomPort": $DICOM_PORT,
  "DicomAet": "$AET",
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false,
  "DicomAlwaysAllowStore": false,
  "DicomAlwaysAllowFind": false,
  "OverwriteInstances": true,
  "StableAge": 2,
  "Plugins": ["$PLUGINS/libOrthancDicomWeb.so"],
  "DicomWeb": {"Enable": true, "Root": "/dicom-web/", "EnableWado": true, "Host": "127.0.0.1:$HTTP_PORT"}
}
EOF
}

start() {
  if running; then echo "[orthanc] already running (pid $(cat "$PID_FILE")) at $URL/dicom-web"; return; fi
  [ -x "$ORTHANC" ] || { echo "[orthanc] error: $ORTHANC not found; run scripts/setup.sh as root or: apt-get install orthanc orthanc-dicomweb" >&2; exit 1; }
  [ -f "$PLUGINS/libOrthancDicomWeb.so" ] || { echo "[orthanc] error: DICOMweb plugin missing in $PLUGINS; apt-get install orthanc-dicomweb" >&2; exit 1; }
  write_config
  nohup "$ORTHANC" "$DIR/orthanc.json" > "$DIR/orthanc.log" 2>&1 < /dev/null &
  echo $! > "$PID_FILE"
  for _ in $(seq 1 60); do
    if curl -sf "$URL/dicom-web/studies" > /dev/null 2>&1; then
      echo "[orthanc] running (pid $(cat "$PID_FILE")): $URL/dicom-web, DICOM $AET@127.0.0.1:$DICOM_PORT, storage $DIR/storage"
      return
    fi
    running || { echo "[orthanc] error: Orthanc exited; log $DIR/orthanc.log:" >&2; tail -20 "$DIR/orthanc.log" >&2; exit 1; }
    sleep 0.5
  done
  echo "[orthanc] error: no answer at $URL within 30 s; log $DIR/orthanc.log" >&2
  stop
  exit 1
}

stop() {
  if ! running; then echo "[orthanc] not running"; rm -f "$PID_FILE"; return; fi
  local pid; pid=$(cat "$PID_FILE")
  kill "$pid"
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  rm -f "$PID_FILE"
  echo "[orthanc] stopped (pid $pid)"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if running; then echo "[orthanc] running (pid $(cat "$PID_FILE")) at $URL/dicom-web"; else echo "[orthanc] not running"; exit 3; fi ;;
  *) echo "usage: $0 start|stop|status (env ORTHANC_DIR, ORTHANC_HTTP_PORT, ORTHANC_DICOM_PORT, ORTHANC_AET)" >&2; exit 2 ;;
esac
