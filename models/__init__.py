"""Pure types of Shoal: records, requests, errors, limits and the filter language. No I/O."""
