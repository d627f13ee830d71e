# Sourced by the *-prepare.sh scripts: split a file too large for one device call into
# parts that each fit one call's 64 MiB carry next to the working tree.
#
#   split_for_carry FILE FIRST_DIR PREFIX NAME
#
# Part 01 fills what is left of FIRST_DIR's call; parts 02, 03, … go to PREFIX02/,
# PREFIX03/, … as NAME.part02, NAME.part03, … (PART overrides their size in bytes). The
# device side concatenates NAME.part* in the order of their number. Prints each folder's
# size.
split_for_carry() {
  local file=$1 first_dir=$2 prefix=$3 name=$4
  local tree limit first size off n dir
  tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)
  limit=$((64 * 1024 * 1024 - tree - 1024 * 1024))
  first=$((limit - $(du -sb "$first_dir" | cut -f1)))
  (( first > 0 )) || { echo "split_for_carry: $first_dir is full before any bytes of $file" >&2; return 1; }
  local part="${PART:-$limit}"
  size=$(stat -c %s "$file")
  dd if="$file" of="$first_dir/$name.part01" bs=1M status=none iflag=count_bytes count="$first"
  off=$first
  n=2
  while (( off < size )); do
    dir=$(printf '%s%02d' "$prefix" "$n")
    mkdir -p "$dir"
    dd if="$file" of="$(printf '%s/%s.part%02d' "$dir" "$name" "$n")" bs=1M status=none \
      iflag=skip_bytes,count_bytes skip="$off" count="$part"
    off=$((off + part))
    n=$((n + 1))
  done
  for dir in "$first_dir" "$prefix"*; do
    [[ -d "$dir" ]] || continue
    echo "$dir: $(du -sb "$dir" | cut -f1) bytes (+ $tree bytes of working tree)"
  done
}
