"""Code shared by the in-image programs hook-bootkit and hook-docker (standard library only,
except hookcommon.http, which needs requests)."""
