// Quantities with units as they appear in job files: bandwidths
// ("100Mbit/s", "1Gbit/s", "25GB/s"), durations ("20ms", "1.5s", "250us") and
// sizes ("64MB", "4KiB"). Internally: bytes per second, seconds, bytes.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "archipelago/core/status.h"

namespace archipelago::core {

// Returns bytes per second. Accepts bit (bit/s, Kbit/s, Mbit/s, Gbit/s,
// Tbit/s; also Kbps/Mbps/Gbps) and byte (B/s, KB/s, MB/s, GB/s, TB/s) rates.
Result<double> parseBandwidth(std::string_view text);
// Returns seconds. Accepts ns, us, ms, s, min, h.
Result<double> parseDuration(std::string_view text);
// Returns bytes. Accepts B, KB/MB/GB/TB (powers of 1000) and KiB/MiB/GiB/TiB.
Result<uint64_t> parseByteSize(std::string_view text);

std::string formatBandwidth(double bytes_per_second);  // "1 Gbit/s"
std::string formatDuration(double seconds);            // "20 ms"
std::string formatBytes(double bytes);                 // "64.0 MiB"

// For text that is read back (a resolved job file): the forms above round
// to 4 digits, which changed 0.9999999Gbit/s into 1Gbit/s on the way.
// The shortest text that parses back to exactly `v`:
std::string formatDoubleExact(double v);
// formatBandwidth / formatDuration when that parses back to exactly the
// value, else the exact number in the base unit ("124999987.5B/s").
std::string formatBandwidthExact(double bytes_per_second);
std::string formatDurationExact(double seconds);

}  // namespace archipelago::core
