"""The router and its frontend: reserving decode space, dispatching prefills, wiring KV links and
fanning tokens out, all through typed worker ports; the frontend turns text into token streams
and back. Imports neither Ray nor torch."""
