// Starts Swagger UI on the gateway's own OpenAPI document (/admin/api/openapi.json, relative
// to the page). The document names no server, so "Try it out" calls this same origin, with
// the Api-Key a person enters under "Authorize". A file, not an inline script, so that the
// page's Content-Security-Policy allows scripts from the gateway only; no validator badge,
// which would load from a third party.
window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
