# The state-folder check of the cluster scripts (sourced, never run; the caller defines die).
# Root trusts what is in a state folder (the PIDs it stops, the namespaces it deletes, the files
# it writes): a folder that is a symlink, not ours, or writable by group or others is refused,
# never repaired, and so is a symlink at any path the caller names inside it.
#   check_state_folder DIR NAME...   (NAME: the files and folders the caller reads or writes in DIR)
check_state_folder() {
  local dir="$1" owner mode name
  shift
  [[ -L "$dir" ]] && die "state folder $dir is a symlink (to $(readlink "$dir")): refusing to trust it; pass a real folder"
  [[ -d "$dir" ]] || die "state folder $dir is not a folder"
  owner="$(stat -c %u "$dir")"
  [[ "$owner" == "$(id -u)" ]] \
    || die "state folder $dir is owned by uid $owner, expected $(id -u) ($(id -un)): someone else may have planted it; remove it or pass another folder"
  mode="$(stat -c %a "$dir")"
  (( (8#$mode & 8#022) == 0 )) \
    || die "state folder $dir has mode $mode, writable by group or others; expected 0755 or tighter (chmod go-w $dir, if its contents are yours)"
  for name in "$@"; do
    [[ -L "$dir/$name" ]] && die "$dir/$name is a symlink (to $(readlink "$dir/$name")): refusing to use it; remove it"
  done
  return 0
}
