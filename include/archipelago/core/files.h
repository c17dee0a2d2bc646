// Reading whole files, and writing files and directories so that a reader
// (another process, a resumed run, a person opening the output) never sees
// half of one. One home for the rule, used by checkpoints, safetensors,
// metrics traces, calibration profiles, catalogs, plans, reports and
// `data prepare`.
#pragma once

#include <filesystem>
#include <string>
#include <string_view>

#include "archipelago/core/status.h"

namespace archipelago::core {

// The whole file as bytes. kNotFound naming the path when it cannot be
// opened (missing, no permission, a directory), kDataLoss when reading
// fails part-way. Callers add what the file is for with withContext().
Result<std::string> readFile(const std::filesystem::path& path);

// Creates or truncates `path` and writes `bytes`. For outputs whose
// readers come after the writer has finished (a report, a file inside a
// temporary directory that is published as a whole), and for paths that
// cannot be replaced by a rename (`--out /dev/stdout`). Errors name the path:
// kUnavailable, or kResourceExhausted when the disk is full.
Status writeFile(const std::filesystem::path& path, std::string_view bytes);

// Readers see the old file or the whole new one, never a part: the bytes go
// to a temporary file in the same directory (same file system, so the
// rename is atomic), are fsync'ed (a crash after the rename cannot leave an
// empty file behind a valid name), and the temporary file is renamed over
// `path`. On failure the temporary file is removed and `path` is untouched;
// the error names `path` and what failed (kUnavailable, or
// kResourceExhausted when the disk is full). Safe to call from several
// threads at once, also for the same path (the last rename wins).
Status writeFileAtomic(const std::filesystem::path& path, std::string_view bytes);

// Creates a new, empty directory "<path><tag>XXXXXX" (a unique suffix) next
// to `path`, on the same file system, to be renamed into place later.
// kUnavailable naming `path` if it cannot be created.
Result<std::filesystem::path> makeSiblingTempDir(const std::filesystem::path& path, std::string_view tag);

// Publishes the directory `tmp` (fully written, a sibling of `final_dir`)
// as `final_dir`. An existing `final_dir` is first moved aside to a unique
// sibling "<final_dir>.old-XXXXXX", `tmp` is renamed into place, and only
// then is the old one removed; if the rename fails the old directory is
// moved back, so a failure never loses what was there. Errors name both
// paths (kUnavailable). Callers that must not replace an existing
// directory check for it first (`data prepare` without --force).
Status replaceDirectoryAtomic(const std::filesystem::path& tmp, const std::filesystem::path& final_dir);

}  // namespace archipelago::core
