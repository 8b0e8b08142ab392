# The essentials of a long run's workdir, kept in git: sourced by results/*/run.sh.
#
# The workdirs live outside the checkout (~/lns_runs), but a session's machine does not
# always come back: on 2026-12-06 a new machine had lost Sessions 13-15's 12 hours of
# runs. So each run.sh packs what a later machine needs into results/<name>/state/, which
# is committed, and unpacks it before it trains:
#   done/<run>.tar.gz     a finished run (summary.json or failed.json): its records
#                         (config.json, metrics.jsonl, result.json, summary.json), and for
#                         a baseline its stages' final checkpoints (what the rows start
#                         from); written once.
#   running/<run>.tar.gz  an unfinished run: its records, its finished stages' final
#                         checkpoints, and the running stage's newest checkpoint and best one
#                         (the resumed stage goes on comparing with it), so it resumes as
#                         if never moved; replaced at every save, removed when it is done.
#                         One over LNS_STORE_MAX_MB (25) is not kept: git carries every
#                         save's bytes for good, and an LNS row's mapping state is 50 MB
#                         for a 25-minute run, which a new machine reruns from its start.
# TensorBoard events are left out (metrics.jsonl has the same).

# store_save WORKDIR STATE: packs WORKDIR's runs into STATE.
store_save() {
  local W=$1 S=$2 d rel out
  [ -d "$W" ] || return 0
  find "$W" -name config.json -printf '%h\n' | sort | while read -r d; do
    rel=${d#"$W"/}
    local excl=(--exclude=./tensorboard --exclude='./.lock*')
    if [ -f "$d/summary.json" ] || [ -f "$d/failed.json" ]; then
      out=$S/done/$rel.tar.gz
      rm -f "$S/running/$rel.tar.gz"
      [ -f "$out" ] && continue
      excl+=(--exclude='./*/checkpoints' --exclude='./*/best')
      [ "$(basename "$d")" = baseline ] || excl+=(--exclude='./*/final')
    else
      out=$S/running/$rel.tar.gz
      # Unchanged since its last archive: the same bytes again would be a new blob in git.
      [ -f "$out" ] && [ -z "$(find "$d" -newer "$out" -print -quit)" ] && continue
      excl+=($(store_stale "$d"))
    fi
    mkdir -p "$(dirname "$out")"
    tar -C "$d" "${excl[@]}" -czf "$out.tmp" . || return 1
    local mb=$(( $(stat -c %s "$out.tmp") / 1048576 ))
    if [ "$mb" -ge "${LNS_STORE_MAX_MB:-25}" ]; then
      rm -f "$out.tmp"
      echo "not saved $out ($mb MB, over LNS_STORE_MAX_MB=${LNS_STORE_MAX_MB:-25}):" \
           "a new machine reruns it from its start"
      continue
    fi
    mv "$out.tmp" "$out"
    echo "saved $out ($(du -h "$out" | cut -f1))"
  done
}

# store_stale RUN: tar --exclude flags for what an unfinished run's resume never reads: a
# finished stage's checkpoints/ and best/ (the next stage starts from its final/), and the
# running stage's checkpoints but the newest.
store_stale() {
  local st steps
  for st in "$1"/*/checkpoints; do
    [ -d "$st" ] || continue
    st=${st%/checkpoints}
    if [ -f "$st/result.json" ]; then
      echo "--exclude=./${st##*/}/checkpoints --exclude=./${st##*/}/best"
    else
      steps=$(ls "$st/checkpoints" | grep -E '^[0-9]+$' | sort -n | head -n -1)
      for n in $steps; do echo "--exclude=./${st##*/}/checkpoints/$n"; done
    fi
  done
}

# store_restore WORKDIR STATE: unpacks STATE's runs that WORKDIR lacks (a run this
# machine already has is never overwritten: it is as new as the archive or newer).
store_restore() {
  local W=$1 S=$2 a kind rel d
  [ -d "$S" ] || return 0
  find "$S" -name '*.tar.gz' | sort | while read -r a; do
    kind=${a#"$S"/}; kind=${kind%%/*}
    rel=${a#"$S"/"$kind"/}; rel=${rel%.tar.gz}
    d=$W/$rel
    [ -f "$d/config.json" ] && continue
    mkdir -p "$d" && tar -C "$d" -xzf "$a" && echo "restored $d from $a"
  done
}
