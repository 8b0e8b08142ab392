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
#   running/<run>.tar.gz  an unfinished run with its newest checkpoints and its best one
#                         (the resumed stage goes on comparing with it), so it resumes as
#                         if never moved; replaced at every save, removed when it is done.
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
    fi
    mkdir -p "$(dirname "$out")"
    tar -C "$d" "${excl[@]}" -czf "$out.tmp" . && mv "$out.tmp" "$out"
    echo "saved $out ($(du -h "$out" | cut -f1))"
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
