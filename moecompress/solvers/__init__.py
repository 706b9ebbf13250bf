"""LP / ILP / DP formulations shared by the allocators (pulp, scipy HiGHS, exact DP)."""
