#!/usr/bin/env bash
# The main job, end to end: train the tiny APT model on the built-in corpus, stop half-way,
# pack the run into one file, unpack it in another folder (as on another machine) and resume.
set -euo pipefail
work=$(mktemp -d "${TMPDIR:-/tmp}/aptbundle-demo.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/machine-a" "$work/machine-b"

cd "$work/machine-a"
echo "== machine A: train 8 epochs of the tiny model, stopping at step 120"
python -m apt_model.training.trainer --run-dir outputs/run1 --model-size tiny --epochs 8 --stop-at-step 120 --save-freq 2
aptbundle inspect outputs/run1
echo "== machine A: pack"
aptbundle pack outputs/run1 -o "$work/run1.aptrun.tar.zst"
rm -rf "$work/machine-a"   # the first machine is gone

cd "$work/machine-b"
echo "== machine B: unpack, verify and resume"
aptbundle unpack "$work/run1.aptrun.tar.zst"
aptbundle verify run1
aptbundle resume
aptbundle inspect run1
python -m apt_model.generate run1 --prompt "The model " --max-new-tokens 80
